//! The hooks' IO: the mesh endpoint where shards send their questions for
//! the application backend (`engine::hooks`), and a pool of threads that
//! ask them over HTTP (each with a kept-alive connection, signed as the
//! webhooks are) and send the answers back to the asking shard. The
//! shards never wait: a question is a mesh message, its answer another.
//! The shards bound how many questions they wait for (`max_waiting`); the
//! pool bounds how many are asked at once (`concurrency`).

use std::os::unix::net::UnixStream;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::HooksConfig;
use crate::engine::hooks::{HookAnswer, HookCall, HookKind};
use crate::engine::{MeshMsg, ShardId};
use crate::http_client::{Client, Url};
use crate::node::Node;

type Handle = JoinHandle<std::io::Result<()>>;

/// Starts the endpoint's thread and the pool.
pub fn spawn(
    node: Arc<Node>,
    bell: UnixStream,
    config: HooksConfig,
) -> std::io::Result<Vec<Handle>> {
    let (jobs, rx) = channel::<Box<HookCall>>();
    let rx = Arc::new(Mutex::new(rx));
    let mut threads = Vec::new();
    for i in 0..config.concurrency {
        let (node, rx, config) = (node.clone(), rx.clone(), config.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("corecast-hook-{i}"))
                .spawn(move || {
                    ask(&node, &rx, &config);
                    Ok(())
                })?,
        );
    }
    threads.push(
        std::thread::Builder::new()
            .name("corecast-hooks".into())
            .spawn(move || run(&node, bell, jobs))?,
    );
    Ok(threads)
}

/// Takes the shards' questions off the mesh and hands them to the pool;
/// parks on the doorbell when there are none. Ends when the node drains
/// (the pool ends with it, once the queue of questions is closed).
fn run(
    node: &Node,
    mut bell: UnixStream,
    jobs: std::sync::mpsc::Sender<Box<HookCall>>,
) -> std::io::Result<()> {
    bell.set_nonblocking(false)?;
    bell.set_read_timeout(Some(Duration::from_millis(500)))?;
    let shards = node.mesh.shards();
    let me = crate::mesh::hooks_endpoint(shards);
    loop {
        let mut any = false;
        for from in 0..shards as ShardId {
            while let Some(msg) = node.mesh.pop(from, me) {
                any = true;
                match msg {
                    MeshMsg::HookCall(call) => {
                        let _ = jobs.send(call);
                    }
                    other => tracing::debug!(?other, "the hooks ignore a message"),
                }
            }
        }
        if node.is_draining() {
            return Ok(());
        }
        if !any && !node.wait_for_mesh(me, &mut bell)? {
            return Ok(());
        }
    }
}

/// One thread of the pool: asks, answers, until the queue closes.
fn ask(node: &Node, rx: &Mutex<Receiver<Box<HookCall>>>, config: &HooksConfig) {
    let me = crate::mesh::hooks_endpoint(node.mesh.shards());
    let timeout = Duration::from_millis(config.timeout_ms);
    let client = |url: &str| {
        (!url.is_empty())
            .then(|| Client::new(Url::parse(url).expect("checked by the config"), timeout))
    };
    let mut publish = client(&config.publish_url);
    let mut rpc = client(&config.rpc_url);
    let mut connect = client(&config.connect_url);
    loop {
        let call = match rx.lock() {
            Ok(rx) => match rx.recv() {
                Ok(call) => call,
                Err(_) => return,
            },
            Err(_) => return,
        };
        let client = match call.kind {
            HookKind::Publish => publish.as_mut(),
            HookKind::Rpc => rpc.as_mut(),
            HookKind::Connect => connect.as_mut(),
        };
        let result = match client {
            Some(c) => crate::webhook::signed_post(c, config.secret.as_bytes(), &[], &call.body),
            None => Err("no URL for this hook".to_owned()),
        };
        let answer = MeshMsg::HookAnswer(Box::new(HookAnswer {
            token: call.token,
            result,
        }));
        node.send_waiting(me, call.from, answer);
    }
}
