{{/*
Chart name, truncated to the 63 characters Kubernetes allows in names and label values.
*/}}
{{- define "triton-serving.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: "<release>-<chart>", or the release name alone when it already contains the chart name.
*/}}
{{- define "triton-serving.fullname" -}}
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

{{/*
"name-version" for the helm.sh/chart label.
*/}}
{{- define "triton-serving.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: stable for the life of a release (Deployment selectors are immutable).
*/}}
{{- define "triton-serving.selectorLabels" -}}
app.kubernetes.io/name: {{ include "triton-serving.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Common labels on every object.
*/}}
{{- define "triton-serving.labels" -}}
helm.sh/chart: {{ include "triton-serving.chart" . }}
{{ include "triton-serving.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: inference-server
app.kubernetes.io/part-of: defectops
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
ServiceAccount name.
*/}}
{{- define "triton-serving.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "triton-serving.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create=false (an existing ServiceAccount with the IRSA annotation)" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Container image: repository:tag, pinned by digest when one is given.
*/}}
{{- define "triton-serving.image" -}}
{{- $image := printf "%s:%s" .Values.image.repository .Values.image.tag }}
{{- if .Values.image.digest }}
{{- $image = printf "%s@%s" $image .Values.image.digest }}
{{- end }}
{{- $image }}
{{- end }}

{{/*
The model repository URI Triton reads: s3://bucket/prefix, or s3://https://host:port/bucket/prefix for an
S3-compatible endpoint (Triton's syntax).
*/}}
{{- define "triton-serving.modelRepositoryUri" -}}
{{- $bucket := required "modelRepository.bucket is required (the S3 bucket holding the Triton model repository)" .Values.modelRepository.bucket }}
{{- $path := $bucket }}
{{- with .Values.modelRepository.prefix }}
{{- $path = printf "%s/%s" $bucket . }}
{{- end }}
{{- if .Values.modelRepository.endpoint }}
{{- printf "s3://%s/%s" .Values.modelRepository.endpoint $path }}
{{- else }}
{{- printf "s3://%s" $path }}
{{- end }}
{{- end }}

{{/*
The prometheus-adapter rule publishing the average queue time per request as a per-pod custom metric.
Single definition: the optional ConfigMap renders it, and tests check prometheus-adapter-values.yaml against it.
*/}}
{{- define "triton-serving.adapterRule" -}}
- seriesQuery: 'nv_inference_queue_duration_us{namespace!="",pod!=""}'
  resources:
    overrides:
      namespace:
        resource: namespace
      pod:
        resource: pod
  name:
    matches: ^nv_inference_queue_duration_us$
    as: {{ .Values.autoscaling.metricName }}
  metricsQuery: >-
    sum by (<<.GroupBy>>) (rate(nv_inference_queue_duration_us{<<.LabelMatchers>>}[{{ .Values.autoscaling.rateWindow }}]))
    / clamp_min(sum by (<<.GroupBy>>) (rate(nv_inference_request_success{<<.LabelMatchers>>}[{{ .Values.autoscaling.rateWindow }}])), 0.001)
{{- end }}
