//! The first step of a reconcile: everything the state machine decides from,
//! gathered once into [`Facts`] (`lifecycle.rs`): the instance and its status,
//! the Secrets it refers to, its token Secret, the codes it sent, the tokens
//! held in memory.

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::{Resource, ResourceExt};

use super::Context;
use super::common::{Error, now, object_key};
use super::inputs::{self, Credentials, Inputs, Problem};
use super::lifecycle::{Auth, Code, Facts, Texts, TokenSecret};
use super::token::{self, AppCredentials, SpentCodes, StoredToken};
use crate::api::DropboxElementInstance;

/// What a reconcile starts from.
pub struct Gathered {
    pub facts: Facts,
    /// Identifies what an attempt is made with (spec generation, credentials):
    /// a change ends a backoff wait at once.
    pub inputs_hash: u64,
    /// The signature key, when events are on and one is referenced.
    pub signature_key: Option<Result<String, Problem>>,
    /// The token Secret's resourceVersion (the precondition of its next write).
    pub token_secret_version: Option<String>,
    /// The code Secret's resourceVersion as read (oauth2).
    pub code_secret_version: Option<String>,
}

/// Gathers the facts of one reconcile.
pub async fn gather(instance: &DropboxElementInstance, ctx: &Context) -> Result<Gathered, Error> {
    let namespace = instance.namespace().ok_or(Error::NotNamespaced)?;
    let uid = instance.uid().unwrap_or_default();
    let deleting = instance.meta().deletion_timestamp.is_some();
    let read = inputs::read(&ctx.client, &ctx.secrets, instance).await?;
    let inputs_hash = inputs_fingerprint(instance, &read);
    let status = instance.status.clone().unwrap_or_default();
    let kept = ctx
        .unstored
        .lock()
        .expect("unstored lock")
        .get(&uid)
        .cloned();
    let secret_name = token::secret_name(&instance.name_any());

    let mut version = None;
    let mut code_secret_version = None;
    let (auth, app, token_secret, signature_key) = match read {
        Err(problem) if !deleting => (Auth::Problem(problem), None, TokenSecret::Absent, None),
        Err(problem) => {
            // Deleting: what matters is the token Secret, whatever else is gone.
            let secret = Api::<Secret>::namespaced(ctx.client.clone(), &namespace)
                .get_opt(&secret_name)
                .await?;
            (
                Auth::Problem(problem),
                None,
                ours(secret.as_ref(), instance),
                None,
            )
        }
        Ok(Inputs {
            app,
            credentials,
            token,
            token_secret_version,
            signature_key,
            token_secret_deleting,
        }) => {
            version = token_secret_version.clone();
            let token_secret = match (&token_secret_deleting, token_secret_version) {
                (Some(s), _) => TokenSecret::Ours {
                    tokens: StoredToken::from_secret(s, instance),
                    deleting: true,
                },
                (None, Some(_)) => TokenSecret::Ours {
                    tokens: token,
                    deleting: false,
                },
                (None, None) => TokenSecret::Absent,
            };
            let auth = match credentials {
                Credentials::ApiKey { token } => Auth::ApiKey { token },
                Credentials::OAuth2 {
                    code,
                    code_verifier,
                    redirect_uri,
                    exchange_redirect_uri,
                    code_secret_version: read_version,
                } => {
                    code_secret_version = read_version;
                    Auth::OAuth2 {
                        authorize_url: ctx.dropbox.authorize_url(
                            &app.as_ref()
                                .map(|a| a.client_id.clone())
                                .unwrap_or_default(),
                            redirect_uri.as_deref(),
                            &object_key(instance),
                        ),
                        code: code.map(|(value, fingerprint)| Code {
                            value,
                            fingerprint,
                            verifier: code_verifier,
                            redirect_uri: exchange_redirect_uri,
                        }),
                    }
                }
            };
            (auth, app, token_secret, signature_key)
        }
    };

    // Every code the instance sent: the annotation, and (from before the set
    // existed) what status and the token Secret name.
    let mut spent = SpentCodes::parse(
        instance
            .annotations()
            .get(token::CODE_SENT_ANNOTATION)
            .map(String::as_str),
    );
    let token_fp = match &token_secret {
        TokenSecret::Ours {
            tokens: Some(t), ..
        } => t.code_fingerprint.clone(),
        _ => None,
    };
    for fp in [status.code_fingerprint.clone(), token_fp]
        .into_iter()
        .flatten()
    {
        spent = spent.with_older(&fp);
    }

    let facts = Facts {
        now: now(),
        deleting,
        has_finalizer: instance.finalizers().iter().any(|f| f == token::FINALIZER),
        auth,
        app,
        spent,
        status,
        token_secret,
        kept,
        texts: texts(instance, secret_name),
        refresh_margin: ctx.config.refresh_margin,
        resync_interval: ctx.config.resync_interval,
    };
    Ok(Gathered {
        facts,
        inputs_hash,
        signature_key,
        token_secret_version: version,
        code_secret_version,
    })
}

/// The token Secret, when the operator made it for this instance.
fn ours(secret: Option<&Secret>, instance: &DropboxElementInstance) -> TokenSecret {
    match secret {
        Some(s) if token::is_ours(s, instance) => TokenSecret::Ours {
            tokens: StoredToken::from_secret(s, instance),
            deleting: s.metadata.deletion_timestamp.is_some(),
        },
        _ => TokenSecret::Absent,
    }
}

fn texts(instance: &DropboxElementInstance, token_secret: String) -> Texts {
    let auth = &instance.spec.authentication;
    let code_location = auth
        .code_secret_ref
        .as_ref()
        .map(|r| format!("Secret {:?} key {:?}", r.name, r.key))
        .unwrap_or_else(|| "the code Secret".into());
    let app_location = auth
        .app_secret_ref
        .as_ref()
        .map(|r| format!("Secret {:?}", r.name))
        .unwrap_or_else(|| "the app Secret".into());
    // `connect` first, the raw way second (docs/user-guide.md, "Connect an account in one command").
    let reapprove_hint = format!(
        "Run `kubectl dropbox connect {} -n {}`, or approve the app again at status.authorizeUrl \
         and put the new code in {code_location}.",
        instance.name_any(),
        instance.namespace().unwrap_or_default(),
    );
    Texts {
        code_location,
        app_location,
        reapprove_hint,
        token_secret,
    }
}

/// Identifies what an attempt was made with: the spec generation and the
/// credentials. A change of any of them ends a backoff wait at once.
fn inputs_fingerprint(instance: &DropboxElementInstance, inputs: &Result<Inputs, Problem>) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    instance.metadata.generation.hash(&mut h);
    if let Ok(inputs) = inputs {
        if let Some(AppCredentials {
            client_id,
            client_secret,
        }) = &inputs.app
        {
            client_id.hash(&mut h);
            client_secret.hash(&mut h);
        }
        if let Some(Ok(key)) = &inputs.signature_key {
            key.hash(&mut h);
        }
        match &inputs.credentials {
            Credentials::OAuth2 {
                code,
                code_verifier,
                exchange_redirect_uri,
                ..
            } => {
                code.as_ref().map(|(_, fp)| fp).hash(&mut h);
                code_verifier.as_ref().map(|v| &v.0).hash(&mut h);
                exchange_redirect_uri.hash(&mut h);
            }
            Credentials::ApiKey { token } => token.0.hash(&mut h),
        }
    }
    h.finish()
}
