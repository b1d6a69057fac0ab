{{/*
Name helpers, as `helm create` writes them.
*/}}
{{- define "nodedrain.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "nodedrain.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "nodedrain.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "nodedrain.labels" -}}
helm.sh/chart: {{ include "nodedrain.chart" . }}
{{ include "nodedrain.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: nodedrain
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels that select the controller's pods; never change them (Deployment selectors are immutable). */}}
{{- define "nodedrain.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nodedrain.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end }}

{{- define "nodedrain.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "nodedrain.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "nodedrain.leaseName" -}}
{{- default (include "nodedrain.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/* The ConfigMap holding the cluster drain policy (created by the chart or the operator's). */}}
{{- define "nodedrain.policyConfigMap" -}}
{{- default (printf "%s-policy" (include "nodedrain.fullname" .)) .Values.policy.existingConfigMap }}
{{- end }}

{{- define "nodedrain.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* host:port for NODEDRAIN_ADMIN_ADDR; IPv6 addresses in brackets. */}}
{{- define "nodedrain.adminAddr" -}}
{{- if contains ":" .Values.admin.bindAddress }}
{{- printf "[%s]:%v" .Values.admin.bindAddress .Values.admin.port }}
{{- else }}
{{- printf "%s:%v" .Values.admin.bindAddress .Values.admin.port }}
{{- end }}
{{- end }}

{{/*
A duration value as the controller reads it: strings as written ("90s", "1h30m"), numbers as
whole seconds. YAML numbers reach templates as float64, which would print as 1e+06.
*/}}
{{- define "nodedrain.duration" -}}
{{- if kindIs "string" . }}{{ . }}{{ else }}{{ int64 . }}{{ end }}
{{- end }}
