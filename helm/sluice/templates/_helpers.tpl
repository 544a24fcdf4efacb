{{/* Names and labels shared by the templates. */}}

{{- define "sluice.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sluice.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sluice.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sluice.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sluice.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "sluice.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "sluice.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sluice.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The configuration file: the values' config with what the chart decides set over it. */}}
{{- define "sluice.config" -}}
{{- $config := deepCopy .Values.config -}}
{{- $_ := set $config "monitoring" (mergeOverwrite (default dict $config.monitoring) (dict "listen" (printf "0.0.0.0:%d" (int .Values.metricsPort)))) -}}
{{- if $config.source.replication -}}
{{- $replication := mergeOverwrite $config.source.replication (dict "spill_dir" "/var/lib/sluice/spill") -}}
{{- $_ := set $config.source "replication" $replication -}}
{{- end -}}
{{- if and (has $config.target.kind (list "dynamodb" "postgres")) .Values.mapping -}}
{{- $_ := set $config.target "mapping" "/etc/sluice/mapping.toml" -}}
{{- end -}}
{{- toPrettyJson $config -}}
{{- end -}}

{{/* The appliers' configuration: the pipeline's name with -appliers, [source.kafka] and their
  target (with the mapping mounted by the chart). */}}
{{- define "sluice.applierConfig" -}}
{{- $target := deepCopy .Values.appliers.target -}}
{{- if and (has $target.kind (list "dynamodb" "postgres")) .Values.mapping -}}
{{- $_ := set $target "mapping" "/etc/sluice/mapping.toml" -}}
{{- end -}}
{{- $name := printf "%s-appliers" (default "default" .Values.config.pipeline.name) -}}
{{- $config := dict "pipeline" (dict "name" $name) "monitoring" (dict "listen" (printf "0.0.0.0:%d" (int .Values.metricsPort))) "source" (dict "kafka" .Values.appliers.source) "target" $target -}}
{{- toPrettyJson $config -}}
{{- end -}}
