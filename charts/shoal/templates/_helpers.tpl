{{/* Names and labels shared by every template. */}}

{{- define "shoal.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "shoal.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/part-of: shoal
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{/* Selector labels of one component: call with (list $ "operator"). */}}
{{- define "shoal.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: shoal-{{ index . 1 }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
{{- end -}}

{{- define "shoal.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The one namespace acted on when scope.namespaced is true. */}}
{{- define "shoal.watchNamespace" -}}
{{- .Values.scope.watchNamespace | default .Release.Namespace -}}
{{- end -}}

{{/* Env shared by both components: the pod IP (listen address) and the kubeconfig. */}}
{{- define "shoal.commonEnv" -}}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- with .Values.kubeconfig }}
- name: KUBECONFIG
  value: {{ . | quote }}
{{- end }}
{{- end -}}

{{/* All labels of one component's objects: call with (list $ "gateway"). */}}
{{- define "shoal.componentLabels" -}}
{{- $root := index . 0 -}}
{{ include "shoal.labels" $root }}
app.kubernetes.io/name: shoal-{{ index . 1 }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}
