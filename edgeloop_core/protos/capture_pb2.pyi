from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class LabelRequest(_message.Message):
    __slots__ = ("request_id", "model_name", "label_json", "class_index", "source")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    LABEL_JSON_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model_name: str
    label_json: str
    class_index: int
    source: str
    def __init__(self, request_id: _Optional[str] = ..., model_name: _Optional[str] = ..., label_json: _Optional[str] = ..., class_index: _Optional[int] = ..., source: _Optional[str] = ...) -> None: ...

class LabelResponse(_message.Message):
    __slots__ = ("outcome", "captures")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    CAPTURES_FIELD_NUMBER: _ClassVar[int]
    outcome: str
    captures: int
    def __init__(self, outcome: _Optional[str] = ..., captures: _Optional[int] = ...) -> None: ...
