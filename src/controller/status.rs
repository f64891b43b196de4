//! The desired status (pure) from the credential verdict and the events step,
//! and the Kubernetes Events a person should see for its transitions. The write
//! itself is fenced like every other (`execute.rs`).

use k8s_openapi::api::events::v1::Event as EventObject;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::{Resource, ResourceExt};

use super::Context;
use super::lifecycle::Verdict;
use super::projection::EventsStep;
use crate::api::{DropboxElementInstance, DropboxElementInstanceStatus, EventsStatus};
use crate::conditions::{self, AUTHORIZED, Desired, EVENTS_DELIVERING, READY, Reason};
use crate::contract::DeliveryState;

/// The full desired status (pure). `delivery` is what the ingress last reported
/// about the instance's deliveries (None: nothing delivered yet); EventsDelivering
/// and `events.lastDeliveryTime` mirror it (the ingress writes no instance).
pub fn desired_status(
    instance: &DropboxElementInstance,
    step: &Verdict,
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
        token: step.token_status.clone(),
        code_fingerprint: step.code_fingerprint.clone(),
        authorize_url: step.authorize_url.clone(),
        // What the last read of the app Secret said; reconcile sets it anew.
        app_key: prev.app_key.clone(),
        events: events.map(|e| EventsStatus {
            webhook_path: e.webhook_path.clone(),
            last_delivery_time: delivery
                .and_then(|d| d.last_delivery_time)
                .map(|t| Time(jiff::Timestamp::from_second(t.as_second()).unwrap_or(t))),
        }),
    }
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
    let reference = instance.object_ref(&());
    // The recorder names an Event `<object name>.<hex time>`: past 253
    // characters for the longest instance names, which get one of their own.
    let result = if instance.name_any().len() > EVENT_NAME_ROOM {
        publish_long(instance, event, ctx, reference).await
    } else {
        ctx.recorder.publish(event, &reference).await
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "could not publish a Kubernetes Event");
    }
}

/// The longest object name the recorder's Event names have room for.
const EVENT_NAME_ROOM: usize = 253 - 17;

async fn publish_long(
    instance: &DropboxElementInstance,
    event: &KubeEvent,
    ctx: &Context,
    reference: k8s_openapi::api::core::v1::ObjectReference,
) -> Result<(), kube::Error> {
    let now = jiff::Timestamp::now();
    let name = format!(
        "{}.{:x}",
        crate::contract::shorten(&instance.name_any(), EVENT_NAME_ROOM),
        now.as_nanosecond()
    );
    let object = EventObject {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: instance.namespace(),
            ..Default::default()
        },
        action: Some(event.action.clone()),
        reason: Some(event.reason.clone()),
        note: event.note.clone(),
        type_: Some(match event.type_ {
            EventType::Normal => "Normal".into(),
            EventType::Warning => "Warning".into(),
        }),
        event_time: Some(MicroTime(now)),
        regarding: Some(reference),
        reporting_controller: Some("dropbox-operator".into()),
        reporting_instance: Some(
            std::env::var("POD_NAME").unwrap_or_else(|_| "dropbox-operator".into()),
        ),
        ..Default::default()
    };
    let events: Api<EventObject> = Api::namespaced(
        ctx.client.clone(),
        &instance.namespace().unwrap_or_default(),
    );
    events.create(&PostParams::default(), &object).await?;
    Ok(())
}
