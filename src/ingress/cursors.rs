//! The committed cursors (`dropbox-cursor-<uid>` in the data namespace), as
//! the replica delivering an instance holds them.
//!
//! A cursor is read from the API server when a replica starts delivering an
//! instance (a new epoch of the fence, see [`super::membership`]) or after a
//! commit lost a race; otherwise the replica works from its own copy and the
//! resourceVersion of its last commit. Commits replace the ConfigMap with that
//! resourceVersion as precondition, so a write by anyone else (the controller
//! re-baselining the cursor) makes the commit fail and the cursor is read
//! again: it only ever moves forward, and a settled replica makes no read per
//! sync.

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};

use crate::contract::{
    self, ACCOUNT_KEY, COMMITTED_AT_KEY, CURSOR_KEY, PATH_KEY, RESET_PENDING_KEY,
};

/// Bound on one API request of the ingress (a request to an API server that
/// went away mid-request must not hold a sync, a report or a heartbeat).
pub const API_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A committed cursor.
#[derive(Clone, Debug)]
pub struct Committed {
    pub cursor: String,
    /// The account and folder it lists.
    pub account: String,
    pub folder: String,
    /// The controller re-baselined it: one `UNKNOWN` event is due.
    pub reset_pending: bool,
    /// When it was committed: the eventDate of folders and deletions listed
    /// from it (docs/architecture.md, "Delivery").
    pub committed_at: jiff::Timestamp,
    /// The ConfigMap it was read from (its resourceVersion is the precondition
    /// of the next commit).
    configmap: ConfigMap,
    /// The fence epoch it was read or committed in.
    epoch: u64,
}

/// Why a cursor could not be used or committed.
#[derive(Debug, thiserror::Error)]
pub enum CursorError {
    #[error("the cursor ConfigMap {0} is missing or was not made by dropbox-operator")]
    Missing(String),
    #[error("the cursor ConfigMap holds no cursor yet")]
    Empty,
    #[error("reading or committing the cursor failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("the API server did not answer within {}s", API_TIMEOUT.as_secs())]
    Timeout,
}

/// The outcome of a commit.
pub enum Commit {
    Done,
    /// Someone else wrote the ConfigMap since it was read: read it again.
    Conflict,
}

/// The cursors of the instances this replica delivers.
pub struct Cursors {
    api: Api<ConfigMap>,
    cache: Mutex<HashMap<String, Committed>>,
}

fn parse(configmap: ConfigMap, epoch: u64) -> Result<Committed, CursorError> {
    let data = configmap.data.clone().unwrap_or_default();
    let cursor = data
        .get(CURSOR_KEY)
        .filter(|c| !c.is_empty())
        .cloned()
        .ok_or(CursorError::Empty)?;
    Ok(Committed {
        cursor,
        account: data.get(ACCOUNT_KEY).cloned().unwrap_or_default(),
        folder: data.get(PATH_KEY).cloned().unwrap_or_default(),
        reset_pending: data.get(RESET_PENDING_KEY).is_some_and(|v| v == "true"),
        // A cursor without the key: when the ConfigMap was made.
        committed_at: data
            .get(COMMITTED_AT_KEY)
            .and_then(|t| t.parse().ok())
            .or_else(|| configmap.metadata.creation_timestamp.as_ref().map(|t| t.0))
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH),
        configmap,
        epoch,
    })
}

impl Cursors {
    pub fn new(api: Api<ConfigMap>) -> Self {
        Cursors {
            api,
            cache: Mutex::default(),
        }
    }

    /// The cursor as this replica holds it, when held since `epoch`.
    pub fn cached(&self, uid: &str, epoch: u64) -> Option<Committed> {
        self.cache
            .lock()
            .expect("cursor cache lock")
            .get(uid)
            .filter(|c| c.epoch == epoch)
            .cloned()
    }

    /// The cursor as this replica last saw it, whatever the epoch (long-polls).
    pub fn last_known(&self, uid: &str) -> Option<Committed> {
        self.cache
            .lock()
            .expect("cursor cache lock")
            .get(uid)
            .cloned()
    }

    /// Reads the committed cursor from the API server.
    pub async fn read(&self, uid: &str, epoch: u64) -> Result<Committed, CursorError> {
        let name = contract::cursor_configmap_name(uid);
        let found = tokio::time::timeout(API_TIMEOUT, self.api.get_opt(&name))
            .await
            .map_err(|_| CursorError::Timeout)??
            .filter(|cm| contract::is_managed(cm.metadata.labels.as_ref()));
        let Some(mut cm) = found else {
            self.forget(uid);
            return Err(CursorError::Missing(name));
        };
        cm.metadata.managed_fields = None;
        let committed = parse(cm, epoch)?;
        self.cache
            .lock()
            .expect("cursor cache lock")
            .insert(uid.to_owned(), committed.clone());
        Ok(committed)
    }

    /// Commits `cursor` over `from` (which must be what is committed now).
    pub async fn commit(
        &self,
        uid: &str,
        from: &Committed,
        cursor: &str,
    ) -> Result<Commit, CursorError> {
        let name = contract::cursor_configmap_name(uid);
        let mut updated = from.configmap.clone();
        let data = updated.data.get_or_insert_with(Default::default);
        data.remove(RESET_PENDING_KEY);
        data.insert(CURSOR_KEY.to_owned(), cursor.to_owned());
        data.insert(
            COMMITTED_AT_KEY.to_owned(),
            jiff::Timestamp::now().to_string(),
        );
        match self
            .api
            .replace(&name, &PostParams::default(), &updated)
            .await
        {
            Ok(mut committed) => {
                committed.metadata.managed_fields = None;
                let committed = parse(committed, from.epoch)?;
                self.cache
                    .lock()
                    .expect("cursor cache lock")
                    .insert(uid.to_owned(), committed);
                Ok(Commit::Done)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                self.forget(uid);
                Ok(Commit::Conflict)
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {
                self.forget(uid);
                Err(CursorError::Missing(name))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn forget(&self, uid: &str) {
        self.cache.lock().expect("cursor cache lock").remove(uid);
    }
}
