//! Step 3 and 4 of a reconcile: the desired status (pure), written with
//! server-side apply only when it differs, and the Kubernetes Events a person
//! should see for its transitions.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::Context;
use super::oauth::AuthStep;
use super::projection::EventsStep;
use super::reconcile::{Error, FIELD_MANAGER};
use crate::api::{DropboxElementInstance, DropboxElementInstanceStatus, EventsStatus};
use crate::conditions::{self, AUTHORIZED, Desired, EVENTS_DELIVERING, READY, Reason};

/// The full desired status (pure). Fields written by the ingress
/// (EventsDelivering, events.lastDeliveryTime) are carried over from the current
/// status so the comparison sees them; [`write_status`] does not send them.
pub fn desired_status(
    instance: &DropboxElementInstance,
    step: &AuthStep,
    events: Option<&EventsStep>,
    now: &Time,
) -> DropboxElementInstanceStatus {
    let prev = instance.status.clone().unwrap_or_default();
    let generation = instance.metadata.generation;
    let existing = &prev.conditions;

    let delivering = events.and_then(|_| conditions::find(existing, EVENTS_DELIVERING));
    let ready = if !step.authorized.is_true() {
        Desired::new(
            READY,
            Some(false),
            step.authorized.reason,
            step.authorized.message.clone(),
        )
    } else if let Some(e) = events.filter(|e| !e.ready.is_true()) {
        Desired::new(READY, Some(false), e.ready.reason, e.ready.message.clone())
    } else if let Some(d) = delivering.filter(|d| d.status == "False") {
        Desired::new(
            READY,
            Some(false),
            delivery_reason(&d.reason),
            format!("Event delivery is failing: {}", d.message),
        )
    } else {
        Desired::new(
            READY,
            Some(true),
            Reason::Ready,
            "The instance is connected to Dropbox",
        )
    };
    let mut conditions = vec![
        step.authorized.to_condition(existing, generation, now),
        ready.to_condition(existing, generation, now),
    ];
    if let Some(e) = events {
        conditions.push(e.ready.to_condition(existing, generation, now));
    }
    if let Some(d) = delivering {
        conditions.push(d.clone());
    }
    DropboxElementInstanceStatus {
        observed_generation: generation,
        phase: Some(conditions::phase(&step.authorized, &ready)),
        conditions,
        account: step.account.clone(),
        token: step.token.clone(),
        code_fingerprint: step.code_fingerprint.clone(),
        authorize_url: step.authorize_url.clone(),
        // What the last read of the app Secret said; reconcile sets it anew.
        app_key: prev.app_key.clone(),
        events: events.map(|e| EventsStatus {
            webhook_path: e.webhook_path.clone(),
            last_delivery_time: prev
                .events
                .as_ref()
                .and_then(|p| p.last_delivery_time.clone()),
        }),
    }
}

fn delivery_reason(reason: &str) -> Reason {
    match reason {
        "CallbackRejected" => Reason::CallbackRejected,
        "CallbackForbidden" => Reason::CallbackForbidden,
        _ => Reason::CallbackUnreachable,
    }
}

/// Server-side apply of the status subresource with the controller's field
/// manager; ingress-owned fields are left out so the two never fight.
pub async fn write_status(
    instance: &DropboxElementInstance,
    desired: &DropboxElementInstanceStatus,
    ctx: &Context,
) -> Result<(), Error> {
    let mut owned = desired.clone();
    owned.conditions.retain(|c| c.type_ != EVENTS_DELIVERING);
    if let Some(events) = owned.events.as_mut() {
        events.last_delivery_time = None;
    }
    let patch = json!({
        "apiVersion": "elements.dropbox-operator.dev/v1alpha1",
        "kind": "DropboxElementInstance",
        "status": owned,
    });
    let api: Api<DropboxElementInstance> = Api::namespaced(
        ctx.client.clone(),
        &instance.namespace().unwrap_or_default(),
    );
    let written = api
        .patch_status(
            &instance.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    ctx.written.record(instance, &written);
    Ok(())
}

/// A Kubernetes Event for a change a person should see: Ready (or, while Ready
/// holds its status, Authorized) changing status or reason. The first success of a
/// new instance gets none (status says it); problems are Warnings, recoveries
/// Normal.
pub async fn publish_transitions(
    instance: &DropboxElementInstance,
    prev: &DropboxElementInstanceStatus,
    desired: &DropboxElementInstanceStatus,
    ctx: &Context,
) {
    let changed = |type_: &str| {
        let new = conditions::find(&desired.conditions, type_)?;
        let old = conditions::find(&prev.conditions, type_);
        let same = old.is_some_and(|o| o.status == new.status && o.reason == new.reason);
        let first_success = old.is_none() && new.status == "True";
        (!same && !first_success).then_some(new)
    };
    let Some(condition) = changed(READY).or_else(|| changed(AUTHORIZED)) else {
        return;
    };
    let event = KubeEvent {
        type_: if condition.status == "True" {
            EventType::Normal
        } else {
            EventType::Warning
        },
        reason: condition.reason.clone(),
        note: Some(condition.message.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    publish(instance, &event, ctx).await;
}

/// Publishes a Kubernetes Event about the instance; a failure is logged, never fatal.
pub async fn publish(instance: &DropboxElementInstance, event: &KubeEvent, ctx: &Context) {
    if let Err(e) = ctx.recorder.publish(event, &instance.object_ref(&())).await {
        tracing::warn!(error = %e, "could not publish a Kubernetes Event");
    }
}
