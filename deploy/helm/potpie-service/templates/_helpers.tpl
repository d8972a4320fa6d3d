{{/*
Expand the name of the chart.
*/}}
{{- define "potpie-service.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name (truncated to 63 chars: some Kubernetes name fields are
limited to this by the DNS naming spec). If the release name contains the chart name it is used as is.
*/}}
{{- define "potpie-service.fullname" -}}
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
Name of one component's objects, "<fullname>-<component>": call with (dict "root" $ "component" "api").
The fullname part is shortened so the whole fits in 63 characters (Service names are DNS-1035 labels).
*/}}
{{- define "potpie-service.componentFullname" -}}
{{- $base := include "potpie-service.fullname" .root | trunc (int (sub 62 (len .component))) | trimSuffix "-" }}
{{- printf "%s-%s" $base .component }}
{{- end }}

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "potpie-service.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels
*/}}
{{- define "potpie-service.labels" -}}
helm.sh/chart: {{ include "potpie-service.chart" . }}
{{ include "potpie-service.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: potpie-service
{{- end }}

{{/*
Selector labels
*/}}
{{- define "potpie-service.selectorLabels" -}}
app.kubernetes.io/name: {{ include "potpie-service.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Component labels / selector labels: call with (dict "root" $ "component" "api").
*/}}
{{- define "potpie-service.componentLabels" -}}
{{ include "potpie-service.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "potpie-service.componentSelectorLabels" -}}
{{ include "potpie-service.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Create the name of the service account to use
*/}}
{{- define "potpie-service.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "potpie-service.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Name of the Secret holding the sensitive variables (an existing one, or the one this chart renders).
*/}}
{{- define "potpie-service.secretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else }}
{{- include "potpie-service.fullname" . }}
{{- end }}
{{- end }}

{{/*
Image reference: call with (dict "root" $ "image" .Values.api.image).
*/}}
{{- define "potpie-service.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}

{{/*
Secret-backed env entries: call with (dict "root" $ "keys" (list "POTPIE_API_KEY" ...)).
Every key is optional, so an existingSecret only needs the keys the deployment uses.
*/}}
{{- define "potpie-service.secretEnv" -}}
{{- $secretName := include "potpie-service.secretName" .root }}
{{- range .keys }}
- name: {{ . }}
  valueFrom:
    secretKeyRef:
      name: {{ $secretName }}
      key: {{ . }}
      optional: true
{{- end }}
{{- end }}

{{/*
Env entries for a TLS Redis whose CA comes from a Secret (explicit env wins over the ConfigMap's envFrom).
*/}}
{{- define "potpie-service.redisTlsEnv" -}}
{{- if .Values.redis.tls.caSecret.name }}
- name: REDIS_TLS_ENABLED
  value: "true"
- name: REDIS_TLS_CA_PATH
  value: {{ printf "%s/%s" (trimSuffix "/" .Values.redis.tls.mountPath) .Values.redis.tls.caSecret.key | quote }}
{{- end }}
{{- end }}

{{/*
Volumes / mounts shared by every pod: /tmp scratch space and the optional Redis CA.
*/}}
{{- define "potpie-service.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpVolume.sizeLimit }}
{{- if .Values.redis.tls.caSecret.name }}
- name: redis-tls-ca
  secret:
    secretName: {{ .Values.redis.tls.caSecret.name }}
    items:
      - key: {{ .Values.redis.tls.caSecret.key }}
        path: {{ .Values.redis.tls.caSecret.key }}
{{- end }}
{{- end }}

{{- define "potpie-service.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.redis.tls.caSecret.name }}
- name: redis-tls-ca
  mountPath: {{ .Values.redis.tls.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/*
Pod template annotations: restart pods when the ConfigMap or the chart-managed Secret changes.
*/}}
{{- define "potpie-service.podAnnotations" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The label matchers every alert puts on the API's series: metrics.prometheusRule.selector, or by default the
namespace of the release and the job the chart's ServiceMonitor gives them (the API Service's name).
*/}}
{{- define "potpie-service.alertSelector" -}}
{{- if .Values.metrics.prometheusRule.selector }}
{{- .Values.metrics.prometheusRule.selector }}
{{- else }}
{{- printf "namespace=%q, job=%q" .Release.Namespace (include "potpie-service.componentFullname" (dict "root" . "component" "api")) }}
{{- end }}
{{- end }}
