{{/* Chart name. */}}
{{- define "edge-runtime.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name. */}}
{{- define "edge-runtime.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Selector labels: never change for the life of a release. */}}
{{- define "edge-runtime.selectorLabels" -}}
app.kubernetes.io/name: {{ include "edge-runtime.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Common labels for object metadata (not the pod template: a chart bump must not restart every Jetson). */}}
{{- define "edge-runtime.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "edge-runtime.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: edgeloop
{{- end }}

{{- define "edge-runtime.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "edge-runtime.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* What the device should serve: the desired file in the ConfigMap, which reaches running pods in place (no checksum
     on the pod template, so a model change restarts no pod). */}}
{{- define "edge-runtime.desired" -}}
{{- if .Values.models -}}
{{- $models := list -}}
{{- range .Values.models -}}
{{- $m := dict "name" .name "version" (default "stable" .version) -}}
{{- if .variant }}{{ $_ := set $m "variant" .variant }}{{ end -}}
{{- if .maxBatchSize }}{{ $_ := set $m "max_batch_size" (int .maxBatchSize) }}{{ end -}}
{{- if hasKey . "maxQueueDelayUs" }}{{ $_ := set $m "max_queue_delay_us" (int .maxQueueDelayUs) }}{{ end -}}
{{- if .batchingBudgetMs }}{{ $_ := set $m "batching_budget_ms" .batchingBudgetMs }}{{ end -}}
{{- if .capture }}{{ $_ := set $m "capture" .capture }}{{ end -}}
{{- $models = append $models $m -}}
{{- end -}}
{{- $desired := dict "models" $models -}}
{{- if .Values.capture }}{{ $_ := set $desired "capture" .Values.capture }}{{ end -}}
{{- $desired | toJson -}}
{{- else -}}
{"model_name": {{ .Values.model.name | quote }}, "model_version": {{ .Values.model.version | quote }}}
{{- end -}}
{{- end }}
