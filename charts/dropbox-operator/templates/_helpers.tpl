{{/*
Name of the chart (or nameOverride), DNS-label safe.
*/}}
{{- define "dropbox-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects: fullnameOverride, else "<release>-<name>",
else "<release>" when the release name already contains the name.
*/}}
{{- define "dropbox-operator.fullname" -}}
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
"<chart>-<version>" for the helm.sh/chart label.
*/}}
{{- define "dropbox-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object of the release.
*/}}
{{- define "dropbox-operator.labels" -}}
helm.sh/chart: {{ include "dropbox-operator.chart" . }}
{{ include "dropbox-operator.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dropbox-operator
{{- end }}

{{/*
Selector labels of the release (name and instance).
*/}}
{{- define "dropbox-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dropbox-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Selector labels of the controller pods. The component label keeps them apart from
the webhook ingress pods, which carry app.kubernetes.io/name=dropbox-operator too.
*/}}
{{- define "dropbox-operator.controllerSelectorLabels" -}}
{{ include "dropbox-operator.selectorLabels" . }}
app.kubernetes.io/component: controller
{{- end }}

{{/*
Selector labels of the webhook ingress pods and Service. The controller sets them
(src/controller/events.rs); they do not depend on the release.
*/}}
{{- define "dropbox-operator.ingressSelectorLabels" -}}
app.kubernetes.io/name: dropbox-operator
app.kubernetes.io/component: webhook-ingress
{{- end }}

{{/*
Name of the controller's ServiceAccount.
*/}}
{{- define "dropbox-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dropbox-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Name of the webhook ingress's ServiceAccount.
*/}}
{{- define "dropbox-operator.ingressServiceAccountName" -}}
{{- required "webhookIngress.serviceAccount.name is required" .Values.webhookIngress.serviceAccount.name }}
{{- end }}

{{/*
Image of the controller.
*/}}
{{- define "dropbox-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}

{{/*
Image of the webhook ingress (defaults to the controller's).
*/}}
{{- define "dropbox-operator.ingressImage" -}}
{{- $repository := default .Values.image.repository .Values.webhookIngress.image.repository }}
{{- $tag := default (default .Chart.AppVersion .Values.image.tag) .Values.webhookIngress.image.tag | toString }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}
