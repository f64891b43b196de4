//! Step 3 and 4 of a reconcile: the desired status (pure), written with
//! server-side apply only when it differs, and the Kubernetes Events a person
//! should see for its transitions. EventsDelivering and
//! `events.lastDeliveryTime` mirror the delivery state the ingress reports in
//! its data namespace (the ingress writes no instance).

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
use crate::contract::DeliveryState;

/// The full desired status (pure). `delivery` is what the ingress last reported
/// about the instance's deliveries (None: nothing delivered yet).
pub fn desired_status(
    instance: &DropboxElementInstance,
    step: &AuthStep,
    events: Option<&EventsStep>,
    delivery: Option<&DeliveryState>,
    now: &Time,
) -> DropboxElementInstanceStatus {
    let prev = instance.status.clone().unwrap_or_default();
    let generation = instance.metadata.generation;
    let existing = &prev.conditions;

    let delivering = events.and(delivery).map(|d| {
        Desired::new(
            EVENTS_DELIVERING,
            Some(d.delivering),
            Reason::parse(&d.reason).unwrap_or(if d.delivering {
                Reason::Delivered
            } else {
                Reason::CallbackUnreachable
            }),
            d.message.clone(),
        )
        .to_condition(existing, generation, now)
    });
    let ready = if !step.authorized.is_true() {
        Desired::new(
            READY,
            Some(false),
            step.authorized.reason,
            step.authorized.message.clone(),
        )
    } else if let Some(e) = events.filter(|e| !e.ready.is_true()) {
        Desired::new(READY, Some(false), e.ready.reason, e.ready.message.clone())
    } else if let Some(d) = delivering.as_ref().filter(|d| d.status == "False") {
        Desired::new(
            READY,
            Some(false),
            Reason::parse(&d.reason).unwrap_or(Reason::CallbackUnreachable),
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
        conditions.push(d);
    }
    DropboxElementInstanceStatus {
        observed_generation: generation,
        phase: Some(conditions::phase(&step.authorized, &ready)),
        conditions,
        account: step.account.clone(),
        token: step.token.clone(),
        code_fingerprint: step.code_fingerprint.clone(),
        authorize_url: step.authorize_url.clone(),
        events: events.map(|e| EventsStatus {
            webhook_path: e.webhook_path.clone(),
            last_delivery_time: delivery
                .and_then(|d| d.last_delivery_time)
                .map(|t| Time(jiff::Timestamp::from_second(t.as_second()).unwrap_or(t))),
        }),
    }
}

/// Server-side apply of the status subresource with the controller's field
/// manager.
pub async fn write_status(
    instance: &DropboxElementInstance,
    desired: &DropboxElementInstanceStatus,
    ctx: &Context,
) -> Result<(), Error> {
    let patch = json!({
        "apiVersion": "elements.dropbox-operator.dev/v1alpha1",
        "kind": "DropboxElementInstance",
        "status": desired,
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
