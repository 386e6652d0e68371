//! The monitor process: detached from berthd, it forks the container init,
//! puts it into its cgroups, reports "created" to the launcher, then runs a
//! poll loop that logs the container's output (and hands it to attached
//! clients), feeds their input to the container's stdin, serves the control
//! socket, reaps children and, once the init has exited, records the exit in
//! status.json, closes every connection and exits.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, pipe2};
use oci_spec::runtime::Spec;
use prost::Message;

use super::attach::{self, Attached};
use super::init::{self, InitStdio};
use super::log::{CriLog, Stream};
use super::protocol::{self, pb};
use super::sync::{FromInit, FromMonitor, SyncSocket};
use super::{
    ContainerState, MonitorConfig, MonitorError, MonitorStatus, Step, StepError, cgroup_dirs,
    now_nanos,
};
use crate::store::{Durability, write_json};

/// Longest text of the launcher report; one pipe write up to PIPE_BUF is atomic.
const MAX_REPORT: usize = 4000;

/// Forks; this process waits for the report of the forked monitor.
pub(super) fn launch(bundle: &Path) -> Result<(), MonitorError> {
    let create_err = |message: String| MonitorError::Create {
        bundle: bundle.to_path_buf(),
        message,
    };
    let bundle =
        std::path::absolute(bundle).map_err(|e| create_err(format!("bundle path: {e}")))?;
    let (report_r, report_w) =
        pipe2(OFlag::O_CLOEXEC).map_err(|e| create_err(format!("pipe: {e}")))?;
    // SAFETY: berthd runs this before it starts any other thread, so the
    // child is a complete copy of a single-threaded process.
    match unsafe { fork() } {
        Err(e) => Err(create_err(format!("fork: {e}"))),
        Ok(ForkResult::Child) => {
            drop(report_r);
            std::process::exit(supervise(&bundle, report_w))
        }
        Ok(ForkResult::Parent { .. }) => {
            drop(report_w);
            // One atomic write; other holders of the pipe (the init, until it
            // execs) never write to it.
            let mut buf = vec![0u8; MAX_REPORT + 1];
            let n = loop {
                match nix::unistd::read(&report_r, &mut buf) {
                    Err(Errno::EINTR) => continue,
                    other => break other,
                }
            }
            .map_err(|e| create_err(format!("read the monitor's report: {e}")))?;
            match buf[..n].split_first() {
                Some((b'O', _)) => Ok(()),
                Some((_, text)) => Err(create_err(String::from_utf8_lossy(text).into_owned())),
                None => Err(create_err(format!(
                    "the monitor exited before the container was created; see {}",
                    bundle.join(super::MONITOR_LOG_FILE).display()
                ))),
            }
        }
    }
}

fn report(pipe: OwnedFd, result: Result<(), &str>) {
    let mut msg = Vec::new();
    match result {
        Ok(()) => msg.push(b'O'),
        Err(text) => {
            msg.push(b'E');
            let mut end = text.len().min(MAX_REPORT - 1);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            msg.extend_from_slice(&text.as_bytes()[..end]);
        }
    }
    let _ = nix::unistd::write(&pipe, &msg);
}

/// The forked monitor; returns its exit code.
fn supervise(bundle: &Path, report_pipe: OwnedFd) -> i32 {
    detach(bundle);
    let mut monitor = match Monitor::create(bundle) {
        Ok(monitor) => monitor,
        Err(e) => {
            let text = e.to_string();
            log_line(&format!("create failed: {text}"));
            record_create_failure(bundle, &text);
            report(report_pipe, Err(&text));
            return 1;
        }
    };
    report(report_pipe, Ok(()));
    super::memory::release_code_pages();
    monitor.serve();
    0
}

/// Own session (no terminal, reparented away from berthd once the launcher
/// exits), reaper of the container's orphans, stdio off berthd's pipes.
fn detach(bundle: &Path) {
    let _ = nix::unistd::setsid();
    let _ = nix::sys::prctl::set_child_subreaper(true);
    let _ = nix::sys::prctl::set_name(c"berth-monitor");
    let _ = nix::unistd::chdir("/");
    if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
        let _ = nix::unistd::dup2_stdin(&null);
        let _ = nix::unistd::dup2_stdout(&null);
        let log = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(bundle.join(super::MONITOR_LOG_FILE));
        match log {
            Ok(log) => {
                let _ = nix::unistd::dup2_stderr(&log);
            }
            Err(_) => {
                let _ = nix::unistd::dup2_stderr(&null);
            }
        }
    }
}

/// A line in monitor.log (the monitor's stderr).
fn log_line(message: &str) {
    let mut line = Vec::new();
    super::log::push_timestamp(&mut line, now_nanos());
    line.extend_from_slice(format!(" {message}\n").as_bytes());
    let _ = std::io::stderr().write_all(&line);
}

fn record_create_failure(bundle: &Path, message: &str) {
    let mut status = MonitorStatus::new(std::process::id() as i32);
    status.state = ContainerState::Exited;
    status.finished_at = now_nanos();
    status.exit_code = super::START_ERROR_EXIT_CODE;
    status.reason = super::REASON_START_ERROR.into();
    status.message = message.into();
    write_status(bundle, &status);
}

fn write_status(bundle: &Path, status: &MonitorStatus) {
    if let Err(e) = write_json(&bundle.join(super::STATUS_FILE), status, Durability::Crash) {
        log_line(&e.to_string());
    }
}

/// The init as forked, with the monitor's ends of its stdio.
struct Spawned {
    pid: Pid,
    sync: SyncSocket,
    /// Write end of the container's stdin pipe, or the pty master.
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
}

struct Client {
    id: u64,
    stream: UnixStream,
    buf: Vec<u8>,
    /// Set once the client attached: its connection carries AttachFrames.
    attach: Option<Attached>,
}

/// What a poll entry stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Sync,
    Signals,
    Output(Stream),
    /// The container's stdin can take the pending input.
    Stdin,
    Listener,
    Client(u64),
}

struct Monitor {
    bundle: PathBuf,
    config: MonitorConfig,
    status: MonitorStatus,
    init: Pid,
    /// Until the init's exec succeeded or it died.
    sync: Option<SyncSocket>,
    /// The container's stdin (non-blocking): pipe write end or pty master.
    stdin: Option<OwnedFd>,
    /// Input of attached clients not yet taken by the container.
    stdin_pending: Vec<u8>,
    /// Close stdin once the pending input is written (stdin_once).
    stdin_closing: bool,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    log: CriLog,
    signals: SignalFd,
    listener: UnixListener,
    /// Keeps a long bundle path reachable through /proc/self/fd.
    _bundle_dir: Option<File>,
    socket_path: PathBuf,
    clients: Vec<Client>,
    next_client: u64,
    start_sent: bool,
    start_error: Option<String>,
    /// Clients waiting for the outcome of Start.
    start_waiters: Vec<u64>,
    init_exit: Option<WaitStatus>,
}

impl Monitor {
    fn create(bundle: &Path) -> Result<Monitor, StepError> {
        let spec: Spec = super::read_bundle_json(&bundle.join(super::CONFIG_FILE))?;
        let config: MonitorConfig =
            super::read_bundle_json(&bundle.join(super::MONITOR_CONFIG_FILE))?;
        // SIGCHLD arrives through a signalfd; SIGPIPE must not kill us when a
        // client goes away. The init unblocks all signals again.
        let mut blocked = SigSet::empty();
        blocked.add(Signal::SIGCHLD);
        blocked.add(Signal::SIGPIPE);
        sigprocmask(SigmaskHow::SIG_BLOCK, Some(&blocked), None).step(|| "block signals".into())?;
        let mut chld = SigSet::empty();
        chld.add(Signal::SIGCHLD);
        let signals = SignalFd::with_flags(&chld, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .step(|| "signalfd".into())?;
        let log = CriLog::open(&config.log_path)
            .step(|| format!("open log {}", config.log_path.display()))?;
        let spawned = spawn(&spec, &config)?;
        drop(spec);
        let mut status = MonitorStatus::new(std::process::id() as i32);
        status.init_pid = spawned.pid.as_raw();
        status.created_at = now_nanos();
        let kill_init = |e: StepError| {
            let _ = kill(spawned.pid, Signal::SIGKILL);
            let _ = waitpid(spawned.pid, None);
            e
        };
        let (socket_path, bundle_dir) = super::socket_path(bundle).map_err(kill_init)?;
        let listener = bind(&socket_path).map_err(kill_init)?;
        write_json(&bundle.join(super::STATUS_FILE), &status, Durability::Crash)
            .map_err(|e| StepError::msg("write status", e.to_string()))
            .map_err(kill_init)?;
        Ok(Monitor {
            bundle: bundle.to_path_buf(),
            config,
            status,
            init: spawned.pid,
            sync: Some(spawned.sync),
            stdin: spawned.stdin,
            stdin_pending: Vec::new(),
            stdin_closing: false,
            stdout: spawned.stdout,
            stderr: spawned.stderr,
            log,
            signals,
            listener,
            _bundle_dir: bundle_dir,
            socket_path,
            clients: Vec::new(),
            next_client: 0,
            start_sent: false,
            start_error: None,
            start_waiters: Vec::new(),
            init_exit: None,
        })
    }

    /// The poll loop, until the init has exited and that is recorded.
    fn serve(&mut self) {
        while self.init_exit.is_none() {
            let ready = match self.wait() {
                Ok(ready) => ready,
                Err(e) => {
                    log_line(&format!("poll: {e}"));
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            for (source, events) in ready {
                match source {
                    Source::Sync => self.on_sync(),
                    Source::Signals => self.on_signal(),
                    Source::Output(stream) => self.on_output(stream),
                    Source::Stdin => self.flush_stdin(),
                    Source::Listener => self.on_accept(),
                    Source::Client(id) => {
                        if events.contains(PollFlags::POLLOUT) {
                            self.flush_client(id);
                        }
                        if events
                            .intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
                        {
                            self.on_client(id);
                        }
                    }
                }
            }
        }
        self.finish();
    }

    /// Polls every source; returns those with events.
    fn wait(&self) -> Result<Vec<(Source, PollFlags)>, Errno> {
        let mut sources = Vec::with_capacity(6 + self.clients.len());
        let mut fds = Vec::with_capacity(6 + self.clients.len());
        let flags = PollFlags::POLLIN;
        if let Some(sync) = &self.sync {
            sources.push(Source::Sync);
            fds.push(PollFd::new(sync.fd().as_fd(), flags));
        }
        sources.push(Source::Signals);
        fds.push(PollFd::new(self.signals.as_fd(), flags));
        if let Some(out) = &self.stdout {
            sources.push(Source::Output(Stream::Stdout));
            fds.push(PollFd::new(out.as_fd(), flags));
        }
        if let Some(err) = &self.stderr {
            sources.push(Source::Output(Stream::Stderr));
            fds.push(PollFd::new(err.as_fd(), flags));
        }
        if let Some(stdin) = &self.stdin
            && !self.stdin_pending.is_empty()
        {
            sources.push(Source::Stdin);
            fds.push(PollFd::new(stdin.as_fd(), PollFlags::POLLOUT));
        }
        sources.push(Source::Listener);
        fds.push(PollFd::new(self.listener.as_fd(), flags));
        // Input waits while the container does not take what it has.
        let take_input = self.stdin_pending.len() < attach::MAX_STDIN_PENDING;
        for client in &self.clients {
            let mut events = PollFlags::empty();
            if client.attach.is_none() || take_input {
                events |= flags;
            }
            if client.attach.as_ref().is_some_and(|a| !a.out.is_empty()) {
                events |= PollFlags::POLLOUT;
            }
            sources.push(Source::Client(client.id));
            fds.push(PollFd::new(client.stream.as_fd(), events));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
        Ok(fds
            .iter()
            .zip(sources)
            .filter_map(|(fd, source)| fd.revents().filter(|r| !r.is_empty()).map(|r| (source, r)))
            .collect())
    }

    /// A message from the init after Start, or EOF: exec done or init gone.
    fn on_sync(&mut self) {
        let Some(sync) = &self.sync else {
            return;
        };
        match sync.recv_from_init() {
            Ok(Some(FromInit::ExecError(text))) => {
                self.start_error = Some(text.clone());
                self.answer_start_waiters(Err(text));
            }
            Ok(Some(other)) => log_line(&format!("unexpected message from the init: {other:?}")),
            Ok(None) => {
                self.sync = None;
                // EOF after Start without an error: the exec succeeded (the
                // process may have exited already).
                if self.start_sent && self.start_error.is_none() {
                    self.status.state = ContainerState::Running;
                    write_status(&self.bundle, &self.status);
                    self.answer_start_waiters(Ok(()));
                    super::memory::release_code_pages();
                }
            }
            Err(e) => {
                log_line(&format!("sync socket: {e}"));
                self.sync = None;
            }
        }
    }

    fn on_signal(&mut self) {
        while let Ok(Some(_)) = self.signals.read_signal() {}
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) => {
                    if status.pid() == Some(self.init) {
                        self.init_exit = Some(status);
                    }
                }
            }
        }
    }

    /// Reads what is there; false once the stream has ended.
    fn read_output(&mut self, stream: Stream) -> bool {
        let mut buf = [0u8; 16 * 1024];
        let fd = match stream {
            Stream::Stdout => &self.stdout,
            Stream::Stderr => &self.stderr,
        };
        let Some(fd) = fd else {
            return false;
        };
        match nix::unistd::read(fd, &mut buf) {
            Ok(0) => false,
            Ok(n) => {
                self.log.write(stream, &buf[..n]);
                self.fan_out(stream, &buf[..n]);
                true
            }
            Err(Errno::EAGAIN | Errno::EINTR) => true,
            // EIO: the pty's last slave is closed.
            Err(_) => false,
        }
    }

    fn on_output(&mut self, stream: Stream) {
        if !self.read_output(stream) {
            match stream {
                Stream::Stdout => self.stdout = None,
                Stream::Stderr => self.stderr = None,
            }
        }
    }

    fn on_accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                    let id = self.next_client;
                    self.next_client += 1;
                    let mut client = Client {
                        id,
                        stream,
                        buf: Vec::new(),
                        attach: None,
                    };
                    let hello = pb::Hello {
                        protocol_version: super::PROTOCOL_VERSION,
                        monitor_pid: self.status.monitor_pid,
                        init_pid: self.status.init_pid,
                    };
                    if client
                        .stream
                        .write_all(&protocol::encode_frame(&hello))
                        .is_ok()
                    {
                        self.clients.push(client);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log_line(&format!("accept: {e}"));
                    return;
                }
            }
        }
    }

    fn on_client(&mut self, id: u64) {
        let Some(index) = self.clients.iter().position(|c| c.id == id) else {
            return;
        };
        let mut chunk = [0u8; 4096];
        let client = &mut self.clients[index];
        match client.stream.read(&mut chunk) {
            Ok(0) | Err(_) => {
                self.drop_client(id);
                return;
            }
            Ok(n) => client.buf.extend_from_slice(&chunk[..n]),
        }
        loop {
            let Some(client) = self.clients.iter_mut().find(|c| c.id == id) else {
                return;
            };
            let attached = client.attach.is_some();
            let body = match protocol::take_frame(&mut client.buf) {
                Ok(Some(body)) => body,
                Ok(None) => return,
                Err(e) => {
                    log_line(&format!("client {id}: {e}"));
                    self.drop_client(id);
                    return;
                }
            };
            if attached {
                self.on_attach_frame(id, &body);
                continue;
            }
            if let Some(response) = self.handle(id, &body) {
                self.send(id, &response);
            }
        }
    }

    /// The response to a request; None when it comes later (Start).
    fn handle(&mut self, id: u64, body: &[u8]) -> Option<pb::Response> {
        let request = match pb::Request::decode(body) {
            Ok(request) => request,
            Err(e) => return Some(self.response(Err(format!("bad request: {e}")))),
        };
        let result = match request.kind {
            None => Err("unsupported".to_string()),
            Some(pb::request::Kind::Start(_)) => match self.start() {
                Ok(()) => {
                    self.start_waiters.push(id);
                    return None;
                }
                Err(e) => Err(e),
            },
            Some(pb::request::Kind::Kill(k)) => self.kill(k.signal, k.all),
            Some(pb::request::Kind::ReopenLog(_)) => self
                .log
                .reopen()
                .map_err(|e| format!("reopen {}: {e}", self.config.log_path.display())),
            Some(pb::request::Kind::Status(_)) => Ok(()),
            Some(pb::request::Kind::Attach(request)) => match self.attach(id, request) {
                Ok(()) => return None,
                Err(e) => Err(e),
            },
        };
        Some(self.response(result))
    }

    fn response(&self, result: Result<(), String>) -> pb::Response {
        let (ok, error) = match result {
            Ok(()) => (true, String::new()),
            Err(e) => (false, e),
        };
        pb::Response {
            ok,
            error,
            status: Some(pb::ContainerStatus::from(&self.status)),
        }
    }

    fn send(&mut self, id: u64, response: &pb::Response) {
        let frame = protocol::encode_frame(response);
        let Some(client) = self.clients.iter_mut().find(|c| c.id == id) else {
            return;
        };
        if client.stream.write_all(&frame).is_err() {
            self.drop_client(id);
        }
    }

    fn drop_client(&mut self, id: u64) {
        let input_open = self
            .clients
            .iter()
            .find(|c| c.id == id)
            .and_then(|c| c.attach.as_ref())
            .is_some_and(|a| a.stdin && !a.stdin_closed);
        self.clients.retain(|c| c.id != id);
        self.start_waiters.retain(|&w| w != id);
        if input_open {
            self.on_input_ended();
        }
    }

    /// Turns the connection of client `id` into an attach session; the ok
    /// response goes out before any output.
    fn attach(&mut self, id: u64, request: pb::AttachRequest) -> Result<(), String> {
        if self.init_exit.is_some() || self.status.state == ContainerState::Exited {
            return Err("container has exited".into());
        }
        let response = self.response(Ok(()));
        self.send(id, &response);
        let Some(client) = self.clients.iter_mut().find(|c| c.id == id) else {
            return Ok(());
        };
        if let Err(e) = client.stream.set_nonblocking(true) {
            log_line(&format!("client {id}: set non-blocking: {e}"));
            self.drop_client(id);
            return Ok(());
        }
        client.attach = Some(Attached::new(&request, self.config.tty));
        Ok(())
    }

    fn on_attach_frame(&mut self, id: u64, body: &[u8]) {
        let frame = match pb::AttachFrame::decode(body) {
            Ok(frame) => frame,
            Err(e) => {
                log_line(&format!("client {id}: bad attach frame: {e}"));
                self.drop_client(id);
                return;
            }
        };
        let Some(attached) = self
            .clients
            .iter_mut()
            .find(|c| c.id == id)
            .and_then(|c| c.attach.as_mut())
        else {
            return;
        };
        match frame.kind {
            Some(pb::attach_frame::Kind::Stdin(data)) => {
                if attached.stdin && !attached.stdin_closed && self.stdin.is_some() {
                    self.stdin_pending.extend_from_slice(&data);
                    self.flush_stdin();
                }
            }
            Some(pb::attach_frame::Kind::CloseStdin(_)) => {
                if attached.stdin && !attached.stdin_closed {
                    attached.stdin_closed = true;
                    self.on_input_ended();
                }
            }
            Some(pb::attach_frame::Kind::Resize(size)) => {
                if self.config.tty
                    && let Some(pty) = self.stdin.as_ref().or(self.stdout.as_ref())
                    && let Err(e) = attach::set_terminal_size(pty, size.width, size.height)
                {
                    log_line(&format!("resize the terminal: {e}"));
                }
            }
            // Output kinds and kinds of a newer client: nothing to do.
            Some(pb::attach_frame::Kind::Stdout(_) | pb::attach_frame::Kind::Stderr(_)) | None => {}
        }
    }

    /// An attached client's input ended: with stdin_once (and no terminal,
    /// as containerd does) the container's stdin closes.
    fn on_input_ended(&mut self) {
        if self.config.stdin_once && !self.config.tty && self.stdin.is_some() {
            self.stdin_closing = true;
            self.flush_stdin();
        }
    }

    /// Writes pending input to the container's stdin, as much as it takes.
    fn flush_stdin(&mut self) {
        let Some(stdin) = &self.stdin else {
            self.stdin_pending.clear();
            return;
        };
        while !self.stdin_pending.is_empty() {
            match nix::unistd::write(stdin, &self.stdin_pending) {
                Ok(n) => {
                    self.stdin_pending.drain(..n);
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return,
                Err(e) => {
                    // EPIPE: nobody reads the container's stdin any more.
                    if e != Errno::EPIPE {
                        log_line(&format!("write the container's stdin: {e}"));
                    }
                    self.stdin_pending.clear();
                    self.stdin = None;
                    return;
                }
            }
        }
        if self.stdin_closing {
            self.stdin = None;
        }
    }

    /// Hands output to every client attached to `stream`.
    fn fan_out(&mut self, stream: Stream, data: &[u8]) {
        let mut frame = None;
        let mut slow = Vec::new();
        for client in &mut self.clients {
            let Some(attached) = client.attach.as_mut() else {
                continue;
            };
            if !attached.wants(stream) {
                continue;
            }
            let frame = frame.get_or_insert_with(|| attach::output_frame(stream, data));
            if !attached.queue(frame) {
                slow.push(client.id);
            }
        }
        for id in slow {
            log_line(&format!(
                "attached client {id} does not take its output; disconnecting it"
            ));
            self.drop_client(id);
        }
        if frame.is_some() {
            let ids: Vec<u64> = self
                .clients
                .iter()
                .filter(|c| c.attach.as_ref().is_some_and(|a| !a.out.is_empty()))
                .map(|c| c.id)
                .collect();
            for id in ids {
                self.flush_client(id);
            }
        }
    }

    /// Writes an attached client's pending output, as much as it takes.
    fn flush_client(&mut self, id: u64) {
        let Some(client) = self.clients.iter_mut().find(|c| c.id == id) else {
            return;
        };
        let Some(attached) = client.attach.as_mut() else {
            return;
        };
        if attached.flush(&mut client.stream).is_err() {
            self.drop_client(id);
        }
    }

    /// Releases the init to exec; the answer waits for the outcome.
    fn start(&mut self) -> Result<(), String> {
        if self.start_sent {
            return match &self.start_error {
                Some(e) => Err(e.clone()),
                None if self.status.state == ContainerState::Created => Ok(()),
                None => Err("container is already started".into()),
            };
        }
        if self.status.state != ContainerState::Created || self.init_exit.is_some() {
            return Err("container is not in the created state".into());
        }
        let Some(sync) = &self.sync else {
            return Err("container init is gone".into());
        };
        sync.send_to_init(FromMonitor::Start)
            .map_err(|e| e.to_string())?;
        self.start_sent = true;
        self.status.started_at = now_nanos();
        Ok(())
    }

    fn answer_start_waiters(&mut self, result: Result<(), String>) {
        let response = self.response(result);
        for id in std::mem::take(&mut self.start_waiters) {
            self.send(id, &response);
        }
    }

    fn kill(&mut self, signal: i32, all: bool) -> Result<(), String> {
        if self.init_exit.is_some() || self.status.state == ContainerState::Exited {
            return Err("container has exited".into());
        }
        let signal = Signal::try_from(signal).map_err(|_| format!("invalid signal {signal}"))?;
        let mut pids = vec![self.init];
        if all {
            for procs in &self.config.cgroup_procs {
                if let Ok(text) = fs::read_to_string(procs) {
                    pids.extend(
                        text.lines()
                            .filter_map(|l| l.trim().parse().ok())
                            .map(Pid::from_raw),
                    );
                }
            }
            pids.sort();
            pids.dedup();
        }
        for pid in pids {
            match kill(pid, signal) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => return Err(format!("kill {pid} with {signal}: {e}")),
            }
        }
        Ok(())
    }

    /// The init has exited: drain its output, record the exit, close every
    /// connection, remove the socket.
    fn finish(&mut self) {
        while self.sync.is_some() {
            self.on_sync();
        }
        for stream in [Stream::Stdout, Stream::Stderr] {
            // Only what is already written: a daemonized child in a shared pid
            // namespace may hold the pipe open forever.
            loop {
                let fd = match stream {
                    Stream::Stdout => &self.stdout,
                    Stream::Stderr => &self.stderr,
                };
                if fd.as_ref().is_none_or(|fd| !readable_now(fd)) || !self.read_output(stream) {
                    break;
                }
            }
        }
        self.log.finish();
        for client in &mut self.clients {
            if let Some(attached) = client.attach.as_mut() {
                attached.flush_before_close(&mut client.stream);
            }
        }
        let status = &mut self.status;
        status.state = ContainerState::Exited;
        status.finished_at = now_nanos();
        match self.init_exit {
            Some(WaitStatus::Exited(_, code)) => {
                status.exit_code = code;
                status.signal = 0;
            }
            Some(WaitStatus::Signaled(_, signal, _)) => {
                status.exit_code = 128 + signal as i32;
                status.signal = signal as i32;
            }
            _ => {}
        }
        if let Some(message) = self.start_error.take() {
            status.exit_code = super::START_ERROR_EXIT_CODE;
            status.reason = super::REASON_START_ERROR.into();
            status.message = message.clone();
            self.start_error = Some(message);
        } else {
            status.oom_killed = oom_killed(&cgroup_dirs(&self.config));
            status.reason = if status.oom_killed {
                super::REASON_OOM_KILLED
            } else if status.exit_code == 0 {
                super::REASON_COMPLETED
            } else {
                super::REASON_ERROR
            }
            .into();
        }
        write_status(&self.bundle, &self.status);
        let error = self
            .start_error
            .clone()
            .unwrap_or_else(|| "container exited before it started".into());
        self.answer_start_waiters(Err(error));
        let _ = fs::remove_file(&self.socket_path);
        self.clients.clear();
    }
}

/// Whether `fd` has data (or EOF) right now.
fn readable_now(fd: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

/// Forks the init in the container's pid namespace, puts it into its
/// cgroups, and waits until it is created (or failed).
fn spawn(spec: &Spec, config: &MonitorConfig) -> Result<Spawned, StepError> {
    let (monitor_end, init_end) = SyncSocket::pair()?;
    let null = File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .step(|| "open /dev/null".into())?;
    let null = || -> Result<OwnedFd, StepError> {
        Ok(OwnedFd::from(
            null.try_clone().step(|| "dup /dev/null".into())?,
        ))
    };
    let pipe = || pipe2(OFlag::O_CLOEXEC).step(|| "pipe".into());
    let (child_stdio, stdin, stdout, stderr) = if config.tty {
        let child_stdio = InitStdio {
            stdin: null()?,
            stdout: null()?,
            stderr: null()?,
        };
        (child_stdio, None, None, None)
    } else {
        let (stdin_child, stdin_parent) = if config.stdin {
            let (r, w) = pipe()?;
            (r, Some(w))
        } else {
            (null()?, None)
        };
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let child_stdio = InitStdio {
            stdin: stdin_child,
            stdout: out_w,
            stderr: err_w,
        };
        (child_stdio, stdin_parent, Some(out_r), Some(err_r))
    };
    init::enter_pid_namespace(spec)?;
    // SAFETY: the monitor has a single thread; the child runs the init steps
    // and exits or execs.
    match unsafe { fork() }.step(|| "fork the container init".into())? {
        ForkResult::Child => {
            drop(monitor_end);
            drop((stdin, stdout, stderr));
            init::run(spec, config, init_end, child_stdio)
        }
        ForkResult::Parent { child } => {
            drop(init_end);
            drop(child_stdio);
            let mut pid = child;
            let created = join_cgroups(config, child)
                .and_then(|()| monitor_end.send_to_init(FromMonitor::Proceed))
                .and_then(|()| wait_created(&monitor_end, &mut pid));
            let pty = match created {
                Ok(pty) => pty,
                Err(e) => {
                    for p in [pid, child] {
                        let _ = kill(p, Signal::SIGKILL);
                        let _ = waitpid(p, None);
                    }
                    return Err(e);
                }
            };
            if pid != child {
                // The first init handed over and exits now.
                let _ = waitpid(child, None);
            }
            let (stdin, stdout) = match pty {
                Some(master) => {
                    let input = master.try_clone().step(|| "dup the pty master".into())?;
                    (Some(input), Some(master))
                }
                None => (stdin, stdout),
            };
            for fd in [&stdin, &stdout, &stderr].into_iter().flatten() {
                fcntl(fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).step(|| "set O_NONBLOCK".into())?;
            }
            Ok(Spawned {
                pid,
                sync: monitor_end,
                stdin,
                stdout,
                stderr,
            })
        }
    }
}

/// Writes the init's pid into each cgroup.procs, before it goes on.
fn join_cgroups(config: &MonitorConfig, pid: Pid) -> Result<(), StepError> {
    for procs in &config.cgroup_procs {
        fs::write(procs, pid.to_string()).step(|| format!("join cgroup {}", procs.display()))?;
    }
    Ok(())
}

/// Waits for Ready; returns the pty master if the init made one. `init`
/// follows the init when it hands over to a PID 1 it forked (then the
/// monitor, a subreaper, inherits that one).
fn wait_created(sync: &SyncSocket, init: &mut Pid) -> Result<Option<OwnedFd>, StepError> {
    let mut pty = None;
    loop {
        match sync.recv_from_init()? {
            Some(FromInit::Pty(fd)) => pty = Some(fd),
            Some(FromInit::Pid(pid)) => *init = Pid::from_raw(pid),
            Some(FromInit::Ready) => return Ok(pty),
            Some(FromInit::SetupError(text)) => {
                return Err(StepError::msg("container init", text));
            }
            Some(FromInit::ExecError(text)) => {
                return Err(StepError::msg("container init", text));
            }
            None => {
                return Err(StepError::msg(
                    "container init",
                    "exited during setup without a report",
                ));
            }
        }
    }
}

fn bind(path: &Path) -> Result<UnixListener, StepError> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).step(|| format!("remove stale {}", path.display())),
    }
    let listener = UnixListener::bind(path).step(|| format!("listen on {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .step(|| format!("chmod {}", path.display()))?;
    listener
        .set_nonblocking(true)
        .step(|| "set the listener non-blocking".into())?;
    Ok(listener)
}

/// Whether the memory cgroup recorded an OOM kill (v1 memory.oom_control,
/// v2 memory.events). The cgroup is the container's alone, so any kill
/// counted there is one of its processes.
fn oom_killed(cgroup_dirs: &[PathBuf]) -> bool {
    cgroup_dirs.iter().any(|dir| {
        ["memory.oom_control", "memory.events"]
            .iter()
            .any(|file| fs::read_to_string(dir.join(file)).is_ok_and(|text| oom_kills(&text) > 0))
    })
}

fn oom_kills(text: &str) -> u64 {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            (parts.next() == Some("oom_kill"))
                .then(|| parts.next()?.parse::<u64>().ok())
                .flatten()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kills_are_counted_from_v1_and_v2_files() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n";
        assert_eq!(oom_kills(v1), 2);
        let v2 = "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(oom_kills(v2), 1);
        assert_eq!(oom_kills("oom_kill_disable 1\n"), 0);
    }
}
