//! xensim's xenstored (xensim.md section 4): `ferrotap xensim xenstored DIR` listens on
//! `DIR/xenstored` and speaks the xs_wire.h protocol to any number of clients, each acting as
//! domain 0.
//!
//! The tree is persistent (`Arc` nodes, copied on write along the changed path), so a
//! transaction's snapshot is one `Arc` clone. A transaction keeps its base snapshot, its own
//! view (snapshot plus its writes), the paths it accessed and its operations; a commit
//! compares every accessed node of the base with the live tree (a node's `gen` changes when
//! it is created, written, re-permissioned or gains/loses a child; `tree_gen` when anything in
//! its subtree does, which a removal checks) and, when nothing changed, replays the
//! operations on the live tree, firing the watches then.
//!
//! Bounds against hostile clients: [`MAX_NODES`] nodes and [`MAX_BYTES`] accounted bytes in
//! the tree (ENOSPC beyond); [`MAX_CONNECTIONS`] connections (more are closed at once);
//! [`MAX_WATCHES_PER_CONN`] watches (E2BIG) with tokens up to [`MAX_TOKEN`] bytes (EINVAL);
//! [`MAX_TRANSACTIONS`] open transactions in all and [`MAX_TX_PER_CONN`] per connection, each
//! of at most [`MAX_TX_OPS`] operations (ENOSPC); [`OUTBOX_MAX`] bytes of replies and events
//! queued for a client that does not read (then it is disconnected). A payload over 4096
//! bytes closes the connection before anything is allocated for it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs;
use std::io::{self, BufReader, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use clap::Args;
use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::xenstore::wire::{
    self, canonical_path, canonical_watch_path, encode_message, Errno, Header, MsgType, ReadError,
    Request, DOM0_HOME, PAYLOAD_MAX,
};

/// Nodes in the tree (the root included).
pub const MAX_NODES: usize = 65_536;
/// Accounted bytes in the tree: names, values, permissions and [`NODE_OVERHEAD`] per node.
pub const MAX_BYTES: usize = 16 << 20;
/// What a node costs beyond its strings, for [`MAX_BYTES`].
const NODE_OVERHEAD: usize = 64;
pub const MAX_CONNECTIONS: usize = 256;
pub const MAX_WATCHES_PER_CONN: usize = 1024;
/// Token length limit: an event (a path of up to 3072 bytes, the token, two NULs) must fit
/// in one payload.
pub const MAX_TOKEN: usize = 1020;
pub const MAX_TRANSACTIONS: usize = 64;
pub const MAX_TX_PER_CONN: usize = 16;
pub const MAX_TX_OPS: usize = 1024;
/// Paths a transaction may access (reads, listings, writes and their created parents).
const MAX_TX_ACCESSED: usize = 8 * MAX_TX_OPS;
pub const OUTBOX_MAX: usize = 4 << 20;
/// Connection threads walk and drop trees as deep as a 3072-byte path allows.
const THREAD_STACK: usize = 8 << 20;

#[derive(Debug, Args)]
pub struct XenstoredArgs {
    /// The simulated host directory ($XENSIM_DIR); the socket is DIR/xenstored.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

/// `ferrotap xensim xenstored DIR`: serve in the foreground until killed.
pub fn run(args: &XenstoredArgs) -> Result<()> {
    let server = Xenstored::bind(&args.dir.join("xenstored"))?;
    eprintln!(
        "ferrotap xensim xenstored: listening on {}",
        server.path.display()
    );
    server.serve()
}

/// A bound, not yet serving, xenstored.
pub struct Xenstored {
    path: PathBuf,
    listener: UnixListener,
}

impl Xenstored {
    /// Bind `socket`, removing a stale socket left there (refusing if a server answers on it).
    pub fn bind(socket: &Path) -> Result<Xenstored> {
        if let Ok(meta) = fs::symlink_metadata(socket) {
            if !meta.file_type().is_socket() {
                return Err(Error::invalid("exists and is not a socket").with_path(socket));
            }
            if UnixStream::connect(socket).is_ok() {
                return Err(
                    Error::invalid("a xenstored is already listening here").with_path(socket)
                );
            }
            fs::remove_file(socket)
                .map_err(|err| Error::io("remove stale socket", err).with_path(socket))?;
        }
        let listener =
            UnixListener::bind(socket).map_err(|err| Error::io("bind", err).with_path(socket))?;
        Ok(Xenstored {
            path: socket.to_path_buf(),
            listener,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accept connections forever, one reader and one writer thread each.
    pub fn serve(self) -> Result<()> {
        let store = Arc::new(Mutex::new(Store::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let mut next_id: ConnId = 0;
        for stream in self.listener.incoming() {
            let stream = match stream {
                Ok(stream) => stream,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    eprintln!("ferrotap xensim xenstored: accept: {err}");
                    continue;
                }
            };
            if connections.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                eprintln!(
                    "ferrotap xensim xenstored: {MAX_CONNECTIONS} connections open; refusing one"
                );
                continue;
            }
            next_id += 1;
            let id = next_id;
            let store = Arc::clone(&store);
            let count = Arc::clone(&connections);
            count.fetch_add(1, Ordering::Relaxed);
            let spawned = thread::Builder::new()
                .name(format!("xenstored-conn-{id}"))
                .stack_size(THREAD_STACK)
                .spawn(move || {
                    if let Err(err) = serve_connection(&store, stream, id) {
                        eprintln!("ferrotap xensim xenstored: connection {id}: {err}");
                    }
                    count.fetch_sub(1, Ordering::Relaxed);
                });
            if let Err(err) = spawned {
                connections.fetch_sub(1, Ordering::Relaxed);
                eprintln!("ferrotap xensim xenstored: spawn connection thread: {err}");
            }
        }
        Ok(())
    }
}

type ConnId = u64;

/// Replies and events waiting for a connection's writer thread.
struct Outbox {
    state: Mutex<OutboxState>,
    ready: Condvar,
    /// Shut down when the client is dropped for not reading (none for [`Offline`]).
    stream: Option<UnixStream>,
}

struct OutboxState {
    queue: VecDeque<Vec<u8>>,
    bytes: usize,
    closed: bool,
}

impl Outbox {
    fn push(&self, message: Vec<u8>) {
        let mut state = self.state.lock();
        if state.closed {
            return;
        }
        if state.bytes + message.len() > OUTBOX_MAX {
            // A client that does not read its replies and events is dropped, not buffered for.
            state.closed = true;
            if let Some(stream) = &self.stream {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
        } else {
            state.bytes += message.len();
            state.queue.push_back(message);
        }
        self.ready.notify_one();
    }

    fn close(&self) {
        self.state.lock().closed = true;
        self.ready.notify_one();
    }

    fn write_loop(&self, mut stream: UnixStream) {
        loop {
            let message = {
                let mut state = self.state.lock();
                loop {
                    if let Some(message) = state.queue.pop_front() {
                        state.bytes -= message.len();
                        break message;
                    }
                    if state.closed {
                        return;
                    }
                    self.ready.wait(&mut state);
                }
            };
            if stream.write_all(&message).is_err() {
                self.close();
                let _ = stream.shutdown(std::net::Shutdown::Both);
                return;
            }
        }
    }
}

impl Outbox {
    fn new(stream: Option<UnixStream>) -> Outbox {
        Outbox {
            state: Mutex::new(OutboxState {
                queue: VecDeque::new(),
                bytes: 0,
                closed: false,
            }),
            ready: Condvar::new(),
            stream,
        }
    }
}

fn serve_connection(store: &Mutex<Store>, stream: UnixStream, id: ConnId) -> io::Result<()> {
    let outbox = Arc::new(Outbox::new(Some(stream.try_clone()?)));
    let writer_stream = stream.try_clone()?;
    let writer_outbox = Arc::clone(&outbox);
    let writer = thread::Builder::new()
        .name(format!("xenstored-out-{id}"))
        .spawn(move || writer_outbox.write_loop(writer_stream))?;
    store.lock().connections.insert(id, Arc::clone(&outbox));
    let mut reader = BufReader::new(&stream);
    let outcome = loop {
        match wire::read_message(&mut reader) {
            Ok(message) => store.lock().handle(id, &message.header, &message.payload),
            Err(ReadError::Closed) => break Ok(()),
            Err(ReadError::Oversized(header)) => {
                break Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "closed: payload of {} bytes announced, more than {PAYLOAD_MAX}",
                        header.len
                    ),
                ))
            }
            Err(ReadError::Io(err)) => break Err(err),
        }
    };
    store.lock().disconnect(id);
    outbox.close();
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let _ = writer.join();
    match outcome {
        // A peer that vanishes mid-message is ordinary for a daemon; only protocol
        // violations are worth a log line.
        Err(err) if err.kind() == io::ErrorKind::InvalidData => Err(err),
        _ => Ok(()),
    }
}

/// A node of the persistent tree.
#[derive(Clone)]
struct Node {
    value: Arc<[u8]>,
    perms: Arc<[Vec<u8>]>,
    /// Changed when this node is created, written, gets new permissions, or gains or loses a
    /// child (DIRECTORY_PART's generation, the transaction conflict check).
    gen: u64,
    /// Changed when anything at or below this node changes (conflict check of a removal).
    tree_gen: u64,
    children: BTreeMap<String, Arc<Node>>,
}

impl Node {
    fn new(value: Arc<[u8]>, perms: Arc<[Vec<u8>]>, gen: u64) -> Node {
        Node {
            value,
            perms,
            gen,
            tree_gen: gen,
            children: BTreeMap::new(),
        }
    }

    fn cost(name: &str, value: &[u8], perms: &[Vec<u8>]) -> usize {
        NODE_OVERHEAD + name.len() + value.len() + perms.iter().map(Vec::len).sum::<usize>()
    }
}

/// The components of a canonical path (none for the root).
fn components(path: &str) -> Vec<&str> {
    path.split('/').filter(|c| !c.is_empty()).collect()
}

/// `path` equals `base` or lies below it.
fn at_or_below(path: &str, base: &str) -> bool {
    base == "/"
        || path == base
        || (path.len() > base.len()
            && path.starts_with(base)
            && path.as_bytes().get(base.len()) == Some(&b'/'))
}

/// A change that fires watches: at `path`, and for a removal also inside it.
struct Change {
    path: String,
    removal: bool,
}

/// A modifying operation, as a transaction records it for replay at commit.
#[derive(Clone)]
enum Op {
    Write(String, Arc<[u8]>),
    Mkdir(String),
    Rm(String),
    SetPerms(String, Arc<[Vec<u8>]>),
}

/// A tree with its size accounting; cloning it is a snapshot.
#[derive(Clone)]
struct Tree {
    root: Arc<Node>,
    nodes: usize,
    bytes: usize,
}

impl Tree {
    fn new(gen: u64) -> Tree {
        let perms: Arc<[Vec<u8>]> = Arc::from(vec![b"n0".to_vec()]);
        let root = Node::new(Arc::from(&b""[..]), Arc::clone(&perms), gen);
        let mut tree = Tree {
            bytes: Node::cost("", &[], &perms),
            root: Arc::new(root),
            nodes: 1,
        };
        // The home of relative paths exists from the start, as on a dom0.
        let _ = tree.apply(&Op::Mkdir(DOM0_HOME.to_string()), gen);
        tree
    }

    fn get(&self, path: &str) -> Option<&Node> {
        let mut node = &*self.root;
        for name in components(path) {
            node = node.children.get(name)?;
        }
        Some(node)
    }

    /// How many leading components of `names` exist, and the deepest existing node.
    fn existing_prefix(&self, names: &[&str]) -> (usize, &Node) {
        let mut node = &*self.root;
        for (depth, name) in names.iter().enumerate() {
            match node.children.get(*name) {
                Some(child) => node = child,
                None => return (depth, node),
            }
        }
        (names.len(), node)
    }

    /// Run `f` on the node at `names` (which must exist), copying the path on write and
    /// marking every node on it as changed at or below.
    fn modify(&mut self, names: &[&str], gen: u64, f: impl FnOnce(&mut Node)) {
        let mut node = Arc::make_mut(&mut self.root);
        node.tree_gen = gen;
        for name in names {
            let Some(child) = node.children.get_mut(*name) else {
                return;
            };
            node = Arc::make_mut(child);
            node.tree_gen = gen;
        }
        f(node);
    }

    fn check_limits(&self, nodes: usize, bytes: usize) -> Result<(), Errno> {
        if self.nodes + nodes > MAX_NODES || self.bytes + bytes > MAX_BYTES {
            Err(Errno::ENOSPC)
        } else {
            Ok(())
        }
    }

    /// Create `path` and its missing parents (the parents empty, all inheriting the nearest
    /// existing ancestor's permissions), or set its value when it exists and `value` is
    /// given. Returns whether anything changed.
    fn put(&mut self, path: &str, value: Option<Arc<[u8]>>, gen: u64) -> Result<bool, Errno> {
        let names = components(path);
        let (depth, node) = self.existing_prefix(&names);
        if depth == names.len() {
            let Some(value) = value else {
                return Ok(false);
            };
            let grown = value.len().saturating_sub(node.value.len());
            self.check_limits(0, grown)?;
            self.bytes = self.bytes + value.len() - node.value.len();
            self.modify(&names, gen, |node| {
                node.value = value;
                node.gen = gen;
            });
            return Ok(true);
        }
        let perms = Arc::clone(&node.perms);
        let missing = &names[depth..];
        let value = value.unwrap_or_else(|| Arc::from(&b""[..]));
        let bytes = value.len()
            + missing
                .iter()
                .map(|name| Node::cost(name, &[], &perms))
                .sum::<usize>();
        self.check_limits(missing.len(), bytes)?;
        let mut chain = Node::new(value, Arc::clone(&perms), gen);
        for pair in missing.windows(2).rev() {
            let mut parent = Node::new(Arc::from(&b""[..]), Arc::clone(&perms), gen);
            parent.children.insert(pair[1].to_string(), Arc::new(chain));
            chain = parent;
        }
        let first = missing
            .first()
            .map(|name| name.to_string())
            .unwrap_or_default();
        self.modify(&names[..depth], gen, |node| {
            node.children.insert(first, Arc::new(chain));
            node.gen = gen;
        });
        self.nodes += missing.len();
        self.bytes += bytes;
        Ok(true)
    }

    fn remove(&mut self, path: &str, gen: u64) -> Result<bool, Errno> {
        let names = components(path);
        let Some((last, parent_names)) = names.split_last() else {
            return Err(Errno::EINVAL);
        };
        let parent_path = format!("/{}", parent_names.join("/"));
        let Some(parent) = self.get(&parent_path) else {
            return Err(Errno::ENOENT);
        };
        let Some(victim) = parent.children.get(*last) else {
            return Ok(false);
        };
        let (nodes, bytes) = subtree_size(last, victim);
        self.modify(parent_names, gen, |node| {
            node.children.remove(*last);
            node.gen = gen;
        });
        self.nodes -= nodes;
        self.bytes -= bytes;
        Ok(true)
    }

    fn set_perms(&mut self, path: &str, perms: Arc<[Vec<u8>]>, gen: u64) -> Result<bool, Errno> {
        let names = components(path);
        let Some(node) = self.get(path) else {
            return Err(Errno::ENOENT);
        };
        let old: usize = node.perms.iter().map(Vec::len).sum();
        let new: usize = perms.iter().map(Vec::len).sum();
        self.check_limits(0, new.saturating_sub(old))?;
        self.bytes = self.bytes + new - old;
        self.modify(&names, gen, |node| {
            node.perms = perms;
            node.gen = gen;
        });
        Ok(true)
    }

    /// Apply one operation; the change to fire watches for, if anything changed.
    fn apply(&mut self, op: &Op, gen: u64) -> Result<Option<Change>, Errno> {
        let (path, changed, removal) = match op {
            Op::Write(path, value) => (path, self.put(path, Some(Arc::clone(value)), gen)?, false),
            Op::Mkdir(path) => (path, self.put(path, None, gen)?, false),
            Op::Rm(path) => (path, self.remove(path, gen)?, true),
            Op::SetPerms(path, perms) => {
                (path, self.set_perms(path, Arc::clone(perms), gen)?, false)
            }
        };
        Ok(changed.then(|| Change {
            path: path.clone(),
            removal,
        }))
    }
}

/// Nodes and accounted bytes of the subtree `node` named `name` (iterative: trees are deep).
fn subtree_size(name: &str, node: &Node) -> (usize, usize) {
    let mut nodes = 0;
    let mut bytes = 0;
    let mut stack = vec![(name, node)];
    while let Some((name, node)) = stack.pop() {
        nodes += 1;
        bytes += Node::cost(name, &node.value, &node.perms);
        stack.extend(node.children.iter().map(|(n, c)| (n.as_str(), &**c)));
    }
    (nodes, bytes)
}

struct Transaction {
    conn: ConnId,
    /// The live tree when the transaction started.
    base: Tree,
    /// `base` plus this transaction's operations.
    view: Tree,
    /// Paths read, listed or written (true: the whole subtree matters, for a removal).
    accessed: HashMap<String, bool>,
    ops: Vec<Op>,
}

impl Transaction {
    fn access(&mut self, path: &str, subtree: bool) -> Result<(), Errno> {
        if let Some(whole) = self.accessed.get_mut(path) {
            *whole |= subtree;
            return Ok(());
        }
        if self.accessed.len() >= MAX_TX_ACCESSED {
            return Err(Errno::ENOSPC);
        }
        self.accessed.insert(path.to_string(), subtree);
        Ok(())
    }

    /// Record what `op` touches: its node, and the parents it creates or changes.
    fn record(&mut self, op: &Op) -> Result<(), Errno> {
        if self.ops.len() >= MAX_TX_OPS {
            return Err(Errno::ENOSPC);
        }
        match op {
            Op::Write(path, _) | Op::Mkdir(path) => {
                self.access(path, false)?;
                let names = components(path);
                let (depth, _) = self.view.existing_prefix(&names);
                if depth < names.len() {
                    for end in depth..names.len() {
                        self.access(&format!("/{}", names[..end].join("/")), false)?;
                    }
                }
            }
            Op::Rm(path) => {
                self.access(path, true)?;
                let names = components(path);
                if let Some((_, parent)) = names.split_last() {
                    self.access(&format!("/{}", parent.join("/")), false)?;
                }
            }
            Op::SetPerms(path, _) => self.access(path, false)?,
        }
        Ok(())
    }

    /// Whether any accessed node differs between the base and `live`.
    fn conflicts_with(&self, live: &Tree) -> bool {
        self.accessed.iter().any(|(path, &subtree)| {
            let stamp = |tree: &Tree| {
                tree.get(path)
                    .map(|node| (node.gen, if subtree { node.tree_gen } else { 0 }))
            };
            stamp(&self.base) != stamp(live)
        })
    }
}

struct Watch {
    conn: ConnId,
    /// As the client registered it: events use this form.
    path: Vec<u8>,
    canonical: String,
    relative: bool,
    token: Vec<u8>,
}

impl Watch {
    fn special(&self) -> bool {
        self.canonical.starts_with('@')
    }

    /// The event path for a change at canonical `path`, in the form the watch was given.
    fn event_path(&self, path: &str) -> Vec<u8> {
        if self.relative {
            if let Some(rest) = path
                .strip_prefix(DOM0_HOME)
                .and_then(|r| r.strip_prefix('/'))
            {
                return rest.as_bytes().to_vec();
            }
        }
        path.as_bytes().to_vec()
    }
}

struct Store {
    tree: Tree,
    gen: u64,
    transactions: HashMap<u32, Transaction>,
    next_tx: u32,
    watches: Vec<Watch>,
    connections: HashMap<ConnId, Arc<Outbox>>,
}

/// What a request produced besides its reply payload.
#[derive(Default)]
struct Effects {
    changes: Vec<Change>,
    /// The event a new watch fires at once: (connection, path, token).
    first_event: Option<(ConnId, Vec<u8>, Vec<u8>)>,
}

impl Store {
    fn new() -> Store {
        Store {
            tree: Tree::new(1),
            gen: 1,
            transactions: HashMap::new(),
            next_tx: 0,
            watches: Vec::new(),
            connections: HashMap::new(),
        }
    }

    fn next_gen(&mut self) -> u64 {
        self.gen += 1;
        self.gen
    }

    fn disconnect(&mut self, conn: ConnId) {
        self.connections.remove(&conn);
        self.forget_watches_and_transactions(conn);
    }

    /// Answer one request: the reply first, then the watch events it caused.
    fn handle(&mut self, conn: ConnId, header: &Header, payload: &[u8]) {
        let mut effects = Effects::default();
        let result = Request::decode(header.msg_type, payload)
            .and_then(|request| self.execute(conn, header.tx_id, request, &mut effects));
        let reply = match result {
            Ok(reply) => encode_message(header.msg_type, header.req_id, header.tx_id, &reply),
            Err(errno) => encode_message(
                MsgType::Error as u32,
                header.req_id,
                header.tx_id,
                &errno.payload(),
            ),
        };
        if let (Some(reply), Some(outbox)) = (reply, self.connections.get(&conn)) {
            outbox.push(reply);
        }
        if let Some((target, path, token)) = effects.first_event {
            self.send_event(target, &path, &token);
        }
        for change in &effects.changes {
            self.fire(change);
        }
    }

    fn send_event(&self, conn: ConnId, path: &[u8], token: &[u8]) {
        let payload = wire::nul_strings([path, token]);
        if let (Some(message), Some(outbox)) = (
            encode_message(MsgType::WatchEvent as u32, 0, 0, &payload),
            self.connections.get(&conn),
        ) {
            outbox.push(message);
        }
    }

    fn fire(&self, change: &Change) {
        for watch in self.watches.iter().filter(|watch| !watch.special()) {
            if at_or_below(&change.path, &watch.canonical) {
                self.send_event(watch.conn, &watch.event_path(&change.path), &watch.token);
            } else if change.removal && at_or_below(&watch.canonical, &change.path) {
                self.send_event(watch.conn, &watch.path, &watch.token);
            }
        }
    }

    /// The transaction `tx_id` of `conn`, ENOENT when it has none of that id.
    fn transaction(&mut self, conn: ConnId, tx_id: u32) -> Result<&mut Transaction, Errno> {
        self.transactions
            .get_mut(&tx_id)
            .filter(|tx| tx.conn == conn)
            .ok_or(Errno::ENOENT)
    }

    /// The tree a read sees (live, or the transaction's view), recording the access.
    fn view(&mut self, conn: ConnId, tx_id: u32, path: &str) -> Result<&Tree, Errno> {
        if tx_id == 0 {
            return Ok(&self.tree);
        }
        let tx = self.transaction(conn, tx_id)?;
        tx.access(path, false)?;
        Ok(&tx.view)
    }

    fn modify(
        &mut self,
        conn: ConnId,
        tx_id: u32,
        op: Op,
        effects: &mut Effects,
    ) -> Result<Vec<u8>, Errno> {
        let gen = self.next_gen();
        if tx_id == 0 {
            effects.changes.extend(self.tree.apply(&op, gen)?);
        } else {
            let tx = self.transaction(conn, tx_id)?;
            tx.record(&op)?;
            tx.view.apply(&op, gen)?;
            tx.ops.push(op);
        }
        Ok(b"OK\0".to_vec())
    }

    fn execute(
        &mut self,
        conn: ConnId,
        tx_id: u32,
        request: Request,
        effects: &mut Effects,
    ) -> Result<Vec<u8>, Errno> {
        match request {
            Request::Read { path } => {
                let path = canonical_path(path)?;
                let node = self
                    .view(conn, tx_id, &path)?
                    .get(&path)
                    .ok_or(Errno::ENOENT)?;
                Ok(node.value.to_vec())
            }
            Request::GetPerms { path } => {
                let path = canonical_path(path)?;
                let node = self
                    .view(conn, tx_id, &path)?
                    .get(&path)
                    .ok_or(Errno::ENOENT)?;
                Ok(wire::nul_strings(node.perms.iter().map(Vec::as_slice)))
            }
            Request::Directory { path } => {
                let path = canonical_path(path)?;
                let node = self
                    .view(conn, tx_id, &path)?
                    .get(&path)
                    .ok_or(Errno::ENOENT)?;
                let listing = wire::nul_strings(node.children.keys().map(String::as_bytes));
                if listing.len() > PAYLOAD_MAX {
                    return Err(Errno::E2BIG);
                }
                Ok(listing)
            }
            Request::DirectoryPart { path, offset } => {
                let path = canonical_path(path)?;
                let node = self
                    .view(conn, tx_id, &path)?
                    .get(&path)
                    .ok_or(Errno::ENOENT)?;
                Ok(directory_part(node, offset))
            }
            Request::Write { path, value } => {
                let op = Op::Write(canonical_path(path)?, Arc::from(value));
                self.modify(conn, tx_id, op, effects)
            }
            Request::Mkdir { path } => {
                let op = Op::Mkdir(canonical_path(path)?);
                self.modify(conn, tx_id, op, effects)
            }
            Request::Rm { path } => {
                let op = Op::Rm(canonical_path(path)?);
                self.modify(conn, tx_id, op, effects)
            }
            Request::SetPerms { path, perms } => {
                let perms: Vec<Vec<u8>> = perms.into_iter().map(<[u8]>::to_vec).collect();
                let op = Op::SetPerms(canonical_path(path)?, Arc::from(perms));
                self.modify(conn, tx_id, op, effects)
            }
            Request::Watch { path, token } => {
                let canonical = canonical_watch_path(path)?;
                if token.len() > MAX_TOKEN {
                    return Err(Errno::EINVAL);
                }
                let mine = self.watches.iter().filter(|w| w.conn == conn);
                if mine
                    .clone()
                    .any(|w| w.canonical == canonical && w.token == token)
                {
                    return Err(Errno::EEXIST);
                }
                if mine.count() >= MAX_WATCHES_PER_CONN {
                    return Err(Errno::E2BIG);
                }
                self.watches.push(Watch {
                    conn,
                    path: path.to_vec(),
                    relative: !path.starts_with(b"/") && !path.starts_with(b"@"),
                    canonical,
                    token: token.to_vec(),
                });
                effects.first_event = Some((conn, path.to_vec(), token.to_vec()));
                Ok(b"OK\0".to_vec())
            }
            Request::Unwatch { path, token } => {
                let canonical = canonical_watch_path(path)?;
                let before = self.watches.len();
                self.watches
                    .retain(|w| !(w.conn == conn && w.canonical == canonical && w.token == token));
                if self.watches.len() == before {
                    return Err(Errno::ENOENT);
                }
                Ok(b"OK\0".to_vec())
            }
            Request::ResetWatches => {
                self.forget_watches_and_transactions(conn);
                Ok(b"OK\0".to_vec())
            }
            Request::TransactionStart => {
                let open = self
                    .transactions
                    .values()
                    .filter(|tx| tx.conn == conn)
                    .count();
                if self.transactions.len() >= MAX_TRANSACTIONS || open >= MAX_TX_PER_CONN {
                    return Err(Errno::ENOSPC);
                }
                let id = loop {
                    self.next_tx = self.next_tx.wrapping_add(1);
                    if self.next_tx != 0 && !self.transactions.contains_key(&self.next_tx) {
                        break self.next_tx;
                    }
                };
                self.transactions.insert(
                    id,
                    Transaction {
                        conn,
                        base: self.tree.clone(),
                        view: self.tree.clone(),
                        accessed: HashMap::new(),
                        ops: Vec::new(),
                    },
                );
                Ok(format!("{id}\0").into_bytes())
            }
            Request::TransactionEnd { commit } => {
                self.transaction(conn, tx_id)?;
                let Some(tx) = self.transactions.remove(&tx_id) else {
                    return Err(Errno::ENOENT);
                };
                if commit {
                    if tx.conflicts_with(&self.tree) {
                        return Err(Errno::EAGAIN);
                    }
                    let mut tree = self.tree.clone();
                    let mut changes = Vec::new();
                    for op in &tx.ops {
                        let gen = self.next_gen();
                        changes.extend(tree.apply(op, gen)?);
                    }
                    self.tree = tree;
                    effects.changes = changes;
                }
                Ok(b"OK\0".to_vec())
            }
            Request::GetDomainPath { domid } => Ok(format!("/local/domain/{domid}\0").into_bytes()),
        }
    }

    fn forget_watches_and_transactions(&mut self, conn: ConnId) {
        self.watches.retain(|watch| watch.conn != conn);
        self.transactions.retain(|_, tx| tx.conn != conn);
    }
}

/// DIRECTORY_PART as xenstored answers it: the node's generation and NUL, then as many whole
/// names (each NUL-terminated) from byte `offset` of the listing as fit, then one more NUL
/// when the listing ends in this reply.
fn directory_part(node: &Node, offset: usize) -> Vec<u8> {
    let listing = wire::nul_strings(node.children.keys().map(String::as_bytes));
    let mut reply = format!("{}\0", node.gen).into_bytes();
    if offset >= listing.len() {
        reply.push(0);
        return reply;
    }
    let room = PAYLOAD_MAX - reply.len() - 1;
    let mut len = 0;
    while offset + len < listing.len() {
        let rest = &listing[offset + len..];
        let name_len = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        if len + name_len >= room {
            break;
        }
        len += name_len + 1;
    }
    let end = (offset + len).min(listing.len());
    reply.extend_from_slice(&listing[offset..end]);
    if end == listing.len() {
        reply.push(0);
    }
    reply
}

/// The server without sockets, for the fuzzer and unit tests: raw requests go in on numbered
/// connections, and what each connection was sent (replies and events) comes out.
pub struct Offline {
    store: Store,
    outboxes: Vec<Arc<Outbox>>,
}

impl Offline {
    pub fn new(connections: usize) -> Offline {
        let mut store = Store::new();
        let mut outboxes = Vec::new();
        for id in 0..connections {
            let outbox = Arc::new(Outbox::new(None));
            store.connections.insert(id as ConnId, Arc::clone(&outbox));
            outboxes.push(outbox);
        }
        Offline { store, outboxes }
    }

    /// Handle one request on connection `conn` (the payload at most 4096 bytes, as the
    /// socket reader guarantees; longer ones are refused here as there).
    pub fn request(&mut self, conn: usize, header: &Header, payload: &[u8]) {
        if payload.len() <= PAYLOAD_MAX && conn < self.outboxes.len() {
            self.store.handle(conn as ConnId, header, payload);
        }
    }

    /// Connection `conn` goes away: its watches and transactions with it.
    pub fn disconnect(&mut self, conn: usize) {
        self.store.forget_watches_and_transactions(conn as ConnId);
    }

    /// Messages sent to connection `conn` since the last call, each header and payload.
    pub fn take_output(&mut self, conn: usize) -> Vec<Vec<u8>> {
        match self.outboxes.get(conn) {
            Some(outbox) => {
                let mut state = outbox.state.lock();
                state.bytes = 0;
                state.queue.drain(..).collect()
            }
            None => Vec::new(),
        }
    }

    /// Recount the live tree and compare with its accounting (nodes, bytes, limits): the
    /// fuzzer's invariant.
    pub fn check_accounting(&self) -> std::result::Result<(), String> {
        let tree = &self.store.tree;
        let (nodes, bytes) = subtree_size("", &tree.root);
        if (nodes, bytes) != (tree.nodes, tree.bytes) {
            return Err(format!(
                "accounted {} nodes / {} bytes, counted {nodes} / {bytes}",
                tree.nodes, tree.bytes
            ));
        }
        if nodes > MAX_NODES || bytes > MAX_BYTES {
            return Err(format!("{nodes} nodes / {bytes} bytes exceed the limits"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(server: &mut Offline, path: &str, value: &[u8]) -> Vec<u8> {
        let payload = [path.as_bytes(), b"\0", value].concat();
        let header = Header {
            msg_type: MsgType::Write as u32,
            req_id: 1,
            tx_id: 0,
            len: payload.len() as u32,
        };
        server.request(0, &header, &payload);
        let mut output = server.take_output(0);
        assert_eq!(output.len(), 1);
        output.pop().unwrap().split_off(wire::HEADER_LEN)
    }

    #[test]
    fn the_node_limit_gives_enospc_and_removal_frees() {
        let mut server = Offline::new(1);
        let mut written = 0;
        loop {
            let reply = write(&mut server, &format!("/n/{written}"), b"");
            if reply == b"ENOSPC\0" {
                break;
            }
            assert_eq!(reply, b"OK\0");
            written += 1;
        }
        // The root, /local, /local/domain, /local/domain/0 and /n exist besides.
        assert_eq!(written, MAX_NODES - 5);
        server.check_accounting().unwrap();
        let payload = b"/n\0";
        let header = Header {
            msg_type: MsgType::Rm as u32,
            req_id: 2,
            tx_id: 0,
            len: 3,
        };
        server.request(0, &header, payload);
        server.take_output(0);
        server.check_accounting().unwrap();
        assert_eq!(server.store.tree.nodes, 4);
        assert_eq!(write(&mut server, "/again", b"x"), b"OK\0");
    }

    fn request(server: &mut Offline, msg_type: MsgType, tx_id: u32, payload: &[u8]) -> Vec<u8> {
        let header = Header {
            msg_type: msg_type as u32,
            req_id: 7,
            tx_id,
            len: payload.len() as u32,
        };
        server.request(0, &header, payload);
        let mut output = server.take_output(0);
        output.remove(0).split_off(wire::HEADER_LEN)
    }

    #[test]
    fn the_deepest_paths_are_written_snapshotted_and_removed() {
        // 1,535 levels: the longest absolute path xenstored allows. Removing it drops the
        // nested nodes recursively, here on a test thread's smaller stack than the 8 MiB of
        // a connection thread.
        let deep = "/a".repeat(wire::ABS_PATH_MAX / 2 - 1) + "/z";
        assert!(deep.len() <= wire::ABS_PATH_MAX);
        let mut server = Offline::new(1);
        assert_eq!(write(&mut server, &deep, b"bottom"), b"OK\0");
        let tx = request(&mut server, MsgType::TransactionStart, 0, b"\0");
        let tx: u32 = std::str::from_utf8(&tx[..tx.len() - 1])
            .unwrap()
            .parse()
            .unwrap();
        let rm = [b"/a".as_slice(), b"\0"].concat();
        assert_eq!(request(&mut server, MsgType::Rm, tx, &rm), b"OK\0");
        // Written below the removed subtree meanwhile: the removal conflicts.
        assert_eq!(write(&mut server, &deep, b"changed"), b"OK\0");
        let end = request(&mut server, MsgType::TransactionEnd, tx, b"T\0");
        assert_eq!(end, b"EAGAIN\0");
        let read = [deep.as_bytes(), b"\0"].concat();
        assert_eq!(request(&mut server, MsgType::Read, 0, &read), b"changed");
        assert_eq!(request(&mut server, MsgType::Rm, 0, &rm), b"OK\0");
        server.check_accounting().unwrap();
        assert_eq!(server.store.tree.nodes, 4);
    }

    #[test]
    fn the_byte_limit_gives_enospc() {
        let mut server = Offline::new(1);
        let value = vec![b'v'; 4000];
        let mut written = 0usize;
        while write(&mut server, &format!("/b/{written}"), &value) == b"OK\0" {
            written += 1;
        }
        assert!(written * 4000 <= MAX_BYTES && (written + 2) * 4100 > MAX_BYTES);
        server.check_accounting().unwrap();
        // Shrinking a value is always allowed.
        assert_eq!(write(&mut server, "/b/0", b"small"), b"OK\0");
        server.check_accounting().unwrap();
    }
}
