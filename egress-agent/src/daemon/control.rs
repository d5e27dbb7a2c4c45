//! Ask mode's control socket: `pending`, `approve` and `deny` reach a running agent through a
//! unix socket only root can open, `/run/egress/<name>/control/agent.sock`.
//!
//! The directory is created fresh by the agent, owned by root, mode 0700; the socket is mode
//! 0600; and the agent serves only peers whose credentials (`SO_PEERCRED`) say uid 0. The
//! command under `run` cannot reach it: it runs as the invoking user or, as root, as root of a
//! user namespace of its own (uid 65534 outside), with no_new_privs (no sudo), so neither the
//! directory nor the socket lets it in. One JSON request a line, one JSON answer a line.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
};

use crate::{
    daemon::{
        approvals::{Approvals, Decision},
        status::STATE_DIR,
    },
    events::ApprovalRequest,
};

/// Longest request line.
const MAX_REQUEST: usize = 4096;

/// The control directory of agent `name`.
pub fn dir(name: &str) -> PathBuf {
    Path::new(STATE_DIR).join(name).join("control")
}

/// The control socket of agent `name`.
pub fn socket_path(name: &str) -> PathBuf {
    dir(name).join("agent.sock")
}

/// A request on the control socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// The requests waiting.
    Pending,
    /// Decide the request `target` names (id, name or address).
    Decide {
        /// Id, name or address.
        target: String,
        /// The decision.
        #[serde(flatten)]
        decision: Decision,
    },
}

/// The answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Answer {
    /// Whether it worked.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What was done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// For `pending`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Vec<ApprovalRequest>>,
}

/// Creates the directory and binds the socket of agent `name` (a directory left by an
/// earlier agent is replaced: nothing in it is trusted).
pub fn bind(name: &str) -> anyhow::Result<UnixListener> {
    let dir = dir(name);
    let parent = dir.parent().expect("control dir has a parent");
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    match fs::symlink_metadata(&dir) {
        Ok(m) if m.is_dir() => {
            fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?
        }
        Ok(_) => {
            fs::remove_file(&dir).with_context(|| format!("cannot remove {}", dir.display()))?
        }
        Err(_) => {}
    }
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let m = fs::symlink_metadata(&dir)?;
    if !m.is_dir() || m.uid() != 0 || m.mode() & 0o077 != 0 {
        bail!(
            "{} is not a directory of root's with mode 0700: refusing to serve approvals there",
            dir.display()
        );
    }
    let path = socket_path(name);
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves requests until dropped.
pub async fn serve(listener: UnixListener, approvals: Arc<Approvals>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let approvals = approvals.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), answer(stream, &approvals)).await;
        });
    }
}

async fn answer(stream: UnixStream, approvals: &Approvals) -> std::io::Result<()> {
    let uid = stream.peer_cred()?.uid();
    let (read, mut write) = stream.into_split();
    let reply = if uid != 0 {
        refuse(format!("uid {uid} may not decide: only root"))
    } else {
        let mut line = String::new();
        let mut reader = tokio::io::BufReader::new(read).take_bounded();
        reader.read_line(&mut line).await?;
        match serde_json::from_str::<Request>(&line) {
            Err(e) => refuse(format!("malformed request: {e}")),
            Ok(Request::Pending) => Answer {
                ok: true,
                pending: Some(approvals.pending()),
                ..Answer::default()
            },
            Ok(Request::Decide { target, decision }) => {
                // The decision reloads the policy and writes files: not on the runtime's
                // threads.
                let by = format!("uid:{uid}");
                match tokio::task::block_in_place(|| approvals.decide(&target, &decision, &by)) {
                    Ok(m) => Answer {
                        ok: true,
                        message: Some(m),
                        ..Answer::default()
                    },
                    Err(e) => refuse(e),
                }
            }
        }
    };
    let mut out = serde_json::to_vec(&reply).unwrap_or_default();
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

fn refuse(error: String) -> Answer {
    Answer {
        ok: false,
        error: Some(error),
        ..Answer::default()
    }
}

/// Bounds what a peer can make the agent read.
trait TakeBounded: Sized {
    fn take_bounded(self) -> tokio::io::Take<Self>;
}

impl<R: tokio::io::AsyncRead + Unpin> TakeBounded for R {
    fn take_bounded(self) -> tokio::io::Take<Self> {
        tokio::io::AsyncReadExt::take(self, MAX_REQUEST as u64)
    }
}

/// Sends `request` to agent `name` and returns its answer (the client side, blocking).
pub fn call(name: &str, request: &Request) -> anyhow::Result<Answer> {
    let path = socket_path(name);
    let stream = std::os::unix::net::UnixStream::connect(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => anyhow::anyhow!(
            "no agent named {name:?} is running in ask mode (no control socket at {})",
            path.display()
        ),
        std::io::ErrorKind::PermissionDenied => anyhow::anyhow!(
            "cannot open {}: only root can decide (try sudo)",
            path.display()
        ),
        _ => anyhow::anyhow!("cannot connect to {}: {e}", path.display()),
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(15)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    (&stream).write_all(&line)?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .with_context(|| format!("no answer from the agent at {}", path.display()))?;
    serde_json::from_str(&reply)
        .with_context(|| format!("unreadable answer from the agent: {reply:?}"))
}
