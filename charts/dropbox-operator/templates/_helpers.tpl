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
Labels of every object of the release: the chart's own and commonLabels (the
schema keeps commonLabels from naming the chart's own).
*/}}
{{- define "dropbox-operator.labels" -}}
helm.sh/chart: {{ include "dropbox-operator.chart" . }}
{{ include "dropbox-operator.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dropbox-operator
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
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
(src/controller/ingress.rs, with the names in src/contract.rs); they do not
depend on the release.
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
"<registry>/<repository>" with global.imageRegistry (the registry host the
repository names, e.g. ghcr.io, replaced by it), else the repository.
Called with (list $ repository).
*/}}
{{- define "dropbox-operator.repository" -}}
{{- $root := index . 0 }}
{{- $repository := index . 1 }}
{{- $registry := "" }}
{{- if $root.Values.global }}{{ $registry = $root.Values.global.imageRegistry | default "" }}{{ end }}
{{- if $registry }}
{{- $parts := splitList "/" $repository }}
{{- $first := first $parts }}
{{- if and (gt (len $parts) 1) (or (contains "." $first) (contains ":" $first) (eq $first "localhost")) }}
{{- $repository = join "/" (rest $parts) }}
{{- end }}
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
Image of the webhook ingress: repository@webhookIngress.image.digest when set;
else the controller's image (digest included) unless the ingress has a
repository or tag of its own; else repository:tag.
*/}}
{{- define "dropbox-operator.ingressImage" -}}
{{- $i := .Values.webhookIngress.image }}
{{- $own := or $i.repository $i.tag }}
{{- $repository := include "dropbox-operator.repository" (list . (default .Values.image.repository $i.repository)) }}
{{- $tag := default (default .Chart.AppVersion .Values.image.tag) $i.tag | toString }}
{{- if $i.digest }}
{{- printf "%s@%s" $repository $i.digest }}
{{- else if and .Values.image.digest (not $own) }}
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
  (dict "name" "WEBHOOK_BODY_BUDGET" "value" ($w.webhookBodyBudget | toString))
  (dict "name" "MAX_CONNECTIONS" "value" ($w.maxConnections | int | toString))
  (dict "name" "WEBHOOK_HEADER_TIMEOUT" "value" $w.webhookHeaderTimeout)
  (dict "name" "WEBHOOK_IDLE_TIMEOUT" "value" $w.webhookIdleTimeout)
  (dict "name" "WEBHOOK_HTTP2" "value" ($w.webhookHttp2 | toString))
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
{{- with merge (dict) ($w.podLabels | default dict) (.Values.commonLabels | default dict) }}{{ $_ := set $metadata "labels" . }}{{ end }}
{{- with $w.podAnnotations }}{{ $_ := set $metadata "annotations" . }}{{ end }}
{{- toJson (dict "metadata" $metadata "spec" $spec) }}
{{- end }}

{{/*
Egress rules of a NetworkPolicy: DNS, the API server, Dropbox and, for the
ingress (second argument true), the callbacks, then egress.extraRules. Called
with (list $egress bool). An empty CIDR list fails the render: leaving its rule
out would cut the pod off from what it needs (templates/validate.yaml says
which one).
*/}}
{{- define "dropbox-operator.egressRules" -}}
{{- $e := index . 0 }}
{{- $callbacks := index . 1 }}
- to:
    {{- toYaml $e.dns | nindent 4 }}
  ports:
    - {port: 53, protocol: UDP}
    - {port: 53, protocol: TCP}
{{- $rules := list (list $e.apiServerCIDRs $e.apiServerPorts) (list $e.dropboxCIDRs $e.dropboxPorts) }}
{{- if $callbacks }}{{ $rules = append $rules (list $e.callbackCIDRs $e.callbackPorts) }}{{ end }}
{{- range $rule := $rules }}
{{- $cidrs := index $rule 0 }}
{{- $ports := index $rule 1 }}
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
{{- with $e.extraRules }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
A duration value as seconds (a float, printed): the forms the binary parses
and the schema allows, `1h30m`, `10s`, `250ms`, `1.5s`, and ISO 8601 `PT1M30S`
/ `P1D`. Called with (list $value "name.of.the.value") for the error message.
*/}}
{{- define "dropbox-operator.seconds" -}}
{{- $value := index . 0 | toString | trim }}
{{- $name := index . 1 }}
{{- $total := 0.0 }}
{{- if hasPrefix "P" $value }}
{{- $iso := "^P(?:([0-9.]+)D)?(?:T(?:([0-9.]+)H)?(?:([0-9.]+)M)?(?:([0-9.]+)S)?)?$" }}
{{- if not (regexMatch $iso $value) }}
{{- fail (printf "%s: %q is not a duration the operator reads (e.g. 30s, 5m, 1h30m, PT30S)" $name $value) }}
{{- end }}
{{- range $i, $factor := list 86400.0 3600.0 60.0 1.0 }}
{{- $part := regexReplaceAll $iso $value (printf "${%d}" (add1 $i)) }}
{{- if $part }}{{ $total = addf $total (mulf (float64 $part) $factor) }}{{ end }}
{{- end }}
{{- else }}
{{- if not (regexMatch "^([0-9]+(\\.[0-9]+)?(ns|us|ms|s|m|h) ?)+$" $value) }}
{{- fail (printf "%s: %q is not a duration the operator reads (e.g. 30s, 5m, 1h30m, PT30S)" $name $value) }}
{{- end }}
{{- $factors := dict "h" 3600.0 "m" 60.0 "s" 1.0 "ms" 0.001 "us" 0.000001 "ns" 0.000000001 }}
{{- range regexFindAll "[0-9]+(\\.[0-9]+)?(ns|us|ms|s|m|h)" $value -1 }}
{{- $unit := regexReplaceAll "^[0-9.]+" . "" }}
{{- $number := regexReplaceAll "[a-z]+$" . "" }}
{{- $total = addf $total (mulf (float64 $number) (index $factors $unit)) }}
{{- end }}
{{- end }}
{{- $total }}
{{- end }}

{{/*
The HorizontalPodAutoscaler spec of the webhook ingress (INGRESS_AUTOSCALER,
JSON, without scaleTargetRef: the controller points it at the Deployment it
makes); empty without webhookIngress.autoscaling.enabled.
*/}}
{{- define "dropbox-operator.ingressAutoscaler" -}}
{{- $a := .Values.webhookIngress.autoscaling }}
{{- if $a.enabled }}
{{- $metrics := list }}
{{- range $resource, $target := dict "cpu" $a.targetCPUUtilizationPercentage "memory" $a.targetMemoryUtilizationPercentage }}
{{- if gt (int $target) 0 }}
{{- $metrics = append $metrics (dict "type" "Resource" "resource" (dict "name" $resource "target" (dict "type" "Utilization" "averageUtilization" (int $target)))) }}
{{- end }}
{{- end }}
{{- $spec := dict "minReplicas" (int $a.minReplicas) "maxReplicas" (int $a.maxReplicas) "metrics" $metrics }}
{{- with $a.behavior }}{{ $_ := set $spec "behavior" . }}{{ end }}
{{- toJson $spec }}
{{- end }}
{{- end }}

{{/*
Scrape settings of a ServiceMonitor endpoint or PodMonitor endpoint, from
metrics.serviceMonitor (called with it).
*/}}
{{- define "dropbox-operator.scrapeSettings" -}}
{{- with .interval }}
interval: {{ . }}
{{- end }}
{{- with .scrapeTimeout }}
scrapeTimeout: {{ . }}
{{- end }}
{{- if .honorLabels }}
honorLabels: true
{{- end }}
{{- with .relabelings }}
relabelings:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .metricRelabelings }}
metricRelabelings:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
