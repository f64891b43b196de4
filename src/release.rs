//! `dropbox-operator release-finalizers` (also `kubectl dropbox
//! release-finalizers`): the escape hatch for a removed controller (docs/operations.md,
//! "Troubleshooting").
//!
//! Instances and their token Secrets carry the finalizer
//! `elements.dropbox-operator.dev/revoke-token`, so the controller revokes
//! their tokens before they go. Without a controller, a deleted instance, and a
//! namespace being deleted, wait forever. This command does what the controller
//! would, with the person's kubeconfig, namespace by namespace, for everything
//! that is being deleted (or is in a namespace being deleted): it revokes the
//! tokens (an expired access token is
//! refreshed first with the app credentials the token Secret keeps, or the
//! instance's app Secret), removes the finalizers from the token Secrets and
//! the instances, and reports what it could not revoke. Objects that are not
//! being deleted are left alone.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, ListParams};
use kube::{Client, Resource, ResourceExt};

use crate::api::DropboxElementInstance;
use crate::cli::ReleaseArgs;
use crate::contract::{MANAGED_BY, MANAGED_BY_LABEL};
use crate::controller::finalizer::{Removal, remove_finalizer};
use crate::controller::revoke::{Revocation, revoke};
use crate::controller::token::{AppCredentials, FINALIZER, StoredToken};
use crate::dropbox::DropboxClient;

/// Why the command stopped; the message is what the person reads.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ReleaseError(String);

fn err(message: impl Into<String>) -> ReleaseError {
    ReleaseError(message.into())
}

/// Exit code when everything was released but some tokens could not be revoked.
pub const EXIT_NOT_REVOKED: u8 = 2;

/// What was done in one namespace.
#[derive(Debug, Default)]
pub struct Report {
    pub instances: usize,
    pub secrets: usize,
    pub revoked: usize,
    /// `Secret ns/name: why`, for tokens that may still be valid.
    pub not_revoked: Vec<String>,
    /// Objects whose finalizer the API server refused to remove.
    pub refused: Vec<String>,
}

/// Runs the subcommand; prints its own report and errors.
pub fn run(args: &ReleaseArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(release_all(args)) {
        Ok(reports) => {
            let mut failed = false;
            let mut unrevoked = false;
            if reports.is_empty() {
                println!("nothing is being deleted: no finalizer to release");
            }
            for (namespace, r) in &reports {
                println!(
                    "namespace {namespace}: {} instances and {} token Secrets {}; {} token families revoked",
                    r.instances,
                    r.secrets,
                    if args.dry_run {
                        "to release (dry run)"
                    } else {
                        "released"
                    },
                    r.revoked
                );
                for line in &r.not_revoked {
                    println!("  could not revoke: {line}");
                }
                for line in &r.refused {
                    println!("  not released (the API server refused): {line}");
                }
                unrevoked |= !r.not_revoked.is_empty();
                failed |= !r.refused.is_empty();
            }
            if unrevoked {
                println!(
                    "tokens that could not be revoked stay valid until the user disconnects the app in the \
                     Dropbox account settings (Connected apps)"
                );
            }
            if failed {
                ExitCode::FAILURE
            } else if unrevoked {
                ExitCode::from(EXIT_NOT_REVOKED)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn kube_client(args: &ReleaseArgs) -> Result<Client, ReleaseError> {
    let config = crate::connect::kube_config(args.kubeconfig.as_deref(), args.context.as_deref())
        .await
        .map_err(err)?;
    Client::try_from(config).map_err(|e| err(format!("Kubernetes client: {e}")))
}

fn ours<K: Resource>(obj: &K) -> bool {
    obj.finalizers().iter().any(|f| f == FINALIZER)
}

fn being_deleted<K: Resource>(obj: &K) -> bool {
    obj.meta().deletion_timestamp.is_some() && ours(obj)
}

/// Namespaces being deleted (everything in them is going); none when they
/// cannot be listed.
async fn terminating(client: &Client) -> BTreeSet<String> {
    Api::<Namespace>::all(client.clone())
        .list_metadata(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .iter()
                .filter(|n| n.metadata.deletion_timestamp.is_some())
                .map(ResourceExt::name_any)
                .collect()
        })
        .unwrap_or_default()
}

async fn release_all(args: &ReleaseArgs) -> Result<BTreeMap<String, Report>, ReleaseError> {
    let client = kube_client(args).await?;
    let dropbox = DropboxClient::new(
        args.dropbox.dropbox_api_url.clone(),
        args.dropbox.dropbox_www_url.clone(),
        args.dropbox.dropbox_timeout,
    )
    .map_err(|e| err(format!("Dropbox client: {e}")))?;
    let terminating = terminating(&client).await;
    let namespaces: BTreeSet<String> = if args.namespace.is_empty() {
        // Every namespace with something of ours being deleted.
        let instances: Api<DropboxElementInstance> = Api::all(client.clone());
        let secrets: Api<Secret> = Api::all(client.clone());
        let labelled = ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
        let mut found: BTreeSet<String> = instances
            .list(&ListParams::default())
            .await
            .map_err(|e| err(format!("listing instances in all namespaces: {e}")))?
            .items
            .iter()
            .filter(|i| ours(*i))
            .filter(|i| {
                being_deleted(*i) || i.namespace().is_some_and(|n| terminating.contains(&n))
            })
            .filter_map(|i| i.namespace())
            .collect();
        found.extend(
            secrets
                .list_metadata(&labelled)
                .await
                .map_err(|e| err(format!("listing Secrets in all namespaces: {e}")))?
                .items
                .iter()
                .filter(|s| ours(*s))
                .filter(|s| {
                    being_deleted(*s) || s.namespace().is_some_and(|n| terminating.contains(&n))
                })
                .filter_map(|s| s.namespace()),
        );
        found
    } else {
        args.namespace.iter().cloned().collect()
    };
    let mut reports = BTreeMap::new();
    for namespace in namespaces {
        let going = terminating.contains(&namespace);
        let report = release_namespace(&client, &dropbox, &namespace, going, args).await?;
        if report.instances + report.secrets > 0 {
            reports.insert(namespace, report);
        }
    }
    Ok(reports)
}

/// The app credentials of an instance's app Secret, when it can be read.
async fn app_of(
    secrets: &Api<Secret>,
    instance: &DropboxElementInstance,
) -> Option<AppCredentials> {
    let app_ref = instance.spec.authentication.app_secret_ref.as_ref()?;
    let secret = secrets.get_opt(&app_ref.name).await.ok()??;
    let data = secret.data?;
    let text = |key: &str| {
        data.get(key)
            .map(|v| String::from_utf8_lossy(&v.0).trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    Some(AppCredentials {
        client_id: text(&app_ref.client_id_key)?,
        client_secret: text(&app_ref.client_secret_key)?,
    })
}

async fn release_namespace(
    client: &Client,
    dropbox: &DropboxClient,
    namespace: &str,
    namespace_going: bool,
    args: &ReleaseArgs,
) -> Result<Report, ReleaseError> {
    let instances: Api<DropboxElementInstance> = Api::namespaced(client.clone(), namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let listing = |what: &str, e: kube::Error| err(format!("listing {what} in {namespace}: {e}"));
    let deleting: Vec<DropboxElementInstance> = instances
        .list(&ListParams::default())
        .await
        .map_err(|e| listing("instances", e))?
        .items
        .into_iter()
        .filter(|i| being_deleted(i) || (namespace_going && ours(i)))
        .collect();
    let labelled = ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    let all_secrets = secrets
        .list(&labelled)
        .await
        .map_err(|e| listing("Secrets", e))?
        .items;
    let mut report = Report::default();
    // Token Secrets to release: those being deleted, and those of instances
    // being deleted (a foreground deletion waits for them).
    let deleting_uids: BTreeSet<String> = deleting.iter().filter_map(|i| i.uid()).collect();
    for secret in all_secrets.iter().filter(|s| {
        ours(*s)
            && (s.meta().deletion_timestamp.is_some()
                || namespace_going
                || s.owner_references()
                    .iter()
                    .any(|o| deleting_uids.contains(&o.uid)))
    }) {
        let key = format!("{namespace}/{}", secret.name_any());
        report.secrets += 1;
        if let Some(tokens) = StoredToken::from_any_secret(secret) {
            // The owner's app Secret, when the token Secret keeps no app credentials.
            let owner = deleting.iter().find(|i| {
                secret
                    .owner_references()
                    .iter()
                    .any(|o| Some(&o.uid) == i.meta().uid.as_ref())
            });
            let app = match owner {
                Some(i) if tokens.app.is_none() => app_of(&secrets, i).await,
                _ => None,
            };
            if args.dry_run {
                report.revoked += 1;
            } else {
                match revoke(dropbox, &tokens, app.as_ref(), args.revoke_timeout).await {
                    outcome if outcome.done() => report.revoked += 1,
                    Revocation::Failed(why) => {
                        report.not_revoked.push(format!("Secret {key}: {why}"))
                    }
                    _ => report.not_revoked.push(format!(
                        "Secret {key}: no answer from Dropbox within {}s",
                        args.revoke_timeout.as_secs()
                    )),
                }
            }
        }
        if !args.dry_run {
            match remove_finalizer(&secrets, secret).await {
                Ok(Removal::Removed) => {}
                Ok(Removal::Refused(why)) => report.refused.push(format!("Secret {key}: {why}")),
                Err(e) => report.refused.push(format!("Secret {key}: {e}")),
            }
        }
    }
    for instance in &deleting {
        let key = format!("{namespace}/{}", instance.name_any());
        report.instances += 1;
        if !args.dry_run {
            match remove_finalizer(&instances, instance).await {
                Ok(Removal::Removed) => {}
                Ok(Removal::Refused(why)) => report.refused.push(format!("instance {key}: {why}")),
                Err(e) => report.refused.push(format!("instance {key}: {e}")),
            }
        }
    }
    Ok(report)
}
