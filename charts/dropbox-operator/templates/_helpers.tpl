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
"<registry>/<repository>" with global.imageRegistry, else the repository.
Called with (list $ repository).
*/}}
{{- define "dropbox-operator.repository" -}}
{{- $root := index . 0 }}
{{- $repository := index . 1 }}
{{- $registry := "" }}
{{- if $root.Values.global }}{{ $registry = $root.Values.global.imageRegistry | default "" }}{{ end }}
{{- if $registry }}
{{- printf "%s/%s" (trimSuffix "/" $registry) $repository }}
{{- else }}
{{- $repository }}
{{- end }}
{{- end }}

{{/*
Image of the controller: repository@digest when image.digest is set, else
repository:tag (tag defaults to the appVersion).
*/}}
{{- define "dropbox-operator.image" -}}
{{- $repository := include "dropbox-operator.repository" (list . .Values.image.repository) }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}
{{- end }}

{{/*
Image of the webhook ingress (defaults to the controller's, digest included
unless the ingress has a repository or tag of its own).
*/}}
{{- define "dropbox-operator.ingressImage" -}}
{{- $own := or .Values.webhookIngress.image.repository .Values.webhookIngress.image.tag }}
{{- $repository := include "dropbox-operator.repository" (list . (default .Values.image.repository .Values.webhookIngress.image.repository)) }}
{{- $tag := default (default .Chart.AppVersion .Values.image.tag) .Values.webhookIngress.image.tag | toString }}
{{- if and .Values.image.digest (not $own) }}
{{- printf "%s@%s" $repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}
{{- end }}

{{/*
The watched namespaces (watchNamespace and watchNamespaces), sorted, comma-
separated; empty: all namespaces.
*/}}
{{- define "dropbox-operator.watchNamespaces" -}}
{{- $all := .Values.watchNamespaces | default list }}
{{- with .Values.watchNamespace }}{{ $all = append $all . }}{{ end }}
{{- $all | uniq | sortAlpha | join "," }}
{{- end }}

{{/*
The ingress's data namespace: webhookIngress.dataNamespace.name, else
"<release namespace>-ingress-data" (within the 63 characters of a name).
*/}}
{{- define "dropbox-operator.dataNamespace" -}}
{{- $name := .Values.webhookIngress.dataNamespace.name | default "" }}
{{- if $name }}
{{- $name }}
{{- else }}
{{- printf "%s-ingress-data" (.Release.Namespace | trunc 50 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{/*
Replicas of the ingress as far as the chart knows them (for the PDB).
*/}}
{{- define "dropbox-operator.ingressMinReplicas" -}}
{{- if .Values.webhookIngress.autoscaling.enabled }}
{{- .Values.webhookIngress.autoscaling.minReplicas | int }}
{{- else }}
{{- .Values.webhookIngress.replicas | int }}
{{- end }}
{{- end }}

{{/*
The pod template the controller merges into the webhook ingress pods
(INGRESS_POD_TEMPLATE, see docs/architecture.md "The ingress pod template"):
the ingress's settings as env, scheduling, labels, annotations, volumes and
security contexts from webhookIngress.*.
*/}}
{{- define "dropbox-operator.ingressPodTemplate" -}}
{{- $w := .Values.webhookIngress }}
{{- $env := list
  (dict "name" "LOG_LEVEL" "value" (default .Values.logLevel $w.logLevel))
  (dict "name" "LOG_FORMAT" "value" (default .Values.logFormat $w.logFormat))
  (dict "name" "MAX_CONCURRENT_WEBHOOKS" "value" ($w.maxConcurrentWebhooks | int | toString))
  (dict "name" "WEBHOOK_BODY_TIMEOUT" "value" $w.webhookBodyTimeout)
  (dict "name" "MAX_CONCURRENT_SYNCS" "value" ($w.maxConcurrentSyncs | int | toString))
  (dict "name" "RESYNC_INTERVAL" "value" $w.resyncInterval)
  (dict "name" "DRAIN_TIMEOUT" "value" $w.drainTimeout)
  (dict "name" "DELIVERY_TIMEOUT" "value" $w.delivery.timeout)
  (dict "name" "DELIVERY_BASE_BACKOFF" "value" $w.delivery.baseBackoff)
  (dict "name" "DELIVERY_MAX_BACKOFF" "value" $w.delivery.maxBackoff)
  (dict "name" "DELIVERY_PARK_AFTER" "value" $w.parkAfter)
  (dict "name" "HEARTBEAT_INTERVAL" "value" $w.heartbeatInterval)
}}
{{- $container := dict "name" "ingress" "env" (concat $env ($w.extraEnv | default list)) }}
{{- with $w.extraVolumeMounts }}{{ $_ := set $container "volumeMounts" . }}{{ end }}
{{- with $w.securityContext }}{{ $_ := set $container "securityContext" . }}{{ end }}
{{- $spec := dict "containers" (list $container) "terminationGracePeriodSeconds" ($w.terminationGracePeriodSeconds | int) }}
{{- with $w.nodeSelector }}{{ $_ := set $spec "nodeSelector" . }}{{ end }}
{{- with $w.tolerations }}{{ $_ := set $spec "tolerations" . }}{{ end }}
{{- with $w.affinity }}{{ $_ := set $spec "affinity" . }}{{ end }}
{{- with $w.topologySpreadConstraints }}{{ $_ := set $spec "topologySpreadConstraints" . }}{{ end }}
{{- with $w.priorityClassName }}{{ $_ := set $spec "priorityClassName" . }}{{ end }}
{{- with $w.extraVolumes }}{{ $_ := set $spec "volumes" . }}{{ end }}
{{- with $w.podSecurityContext }}{{ $_ := set $spec "securityContext" . }}{{ end }}
{{- $metadata := dict }}
{{- with $w.podLabels }}{{ $_ := set $metadata "labels" . }}{{ end }}
{{- with $w.podAnnotations }}{{ $_ := set $metadata "annotations" . }}{{ end }}
{{- toJson (dict "metadata" $metadata "spec" $spec) }}
{{- end }}

{{/*
Egress rules of a NetworkPolicy: DNS, the API server, Dropbox and, for the
ingress (second argument true), the callbacks. Called with (list $egress bool).
*/}}
{{- define "dropbox-operator.egressRules" -}}
{{- $e := index . 0 }}
{{- $callbacks := index . 1 }}
- to:
    {{- toYaml $e.dns | nindent 4 }}
  ports:
    - {port: 53, protocol: UDP}
    - {port: 53, protocol: TCP}
{{- range $rule := list (list $e.apiServerCIDRs $e.apiServerPorts) (list $e.dropboxCIDRs $e.dropboxPorts) (ternary (list $e.callbackCIDRs $e.callbackPorts) (list list list) $callbacks) }}
{{- $cidrs := index $rule 0 }}
{{- $ports := index $rule 1 }}
{{- if $cidrs }}
- to:
    {{- range $cidrs }}
    - ipBlock: {cidr: {{ . | quote }}}
    {{- end }}
  {{- with $ports }}
  ports:
    {{- range . }}
    - {port: {{ . }}, protocol: TCP}
    {{- end }}
  {{- end }}
{{- end }}
{{- end }}
{{- end }}
