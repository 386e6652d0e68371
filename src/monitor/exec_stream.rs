//! The streaming side of `berthd exec-in` (Exec with stdin, a terminal or
//! live output): the command's stdio is a terminal opened from the
//! container's own devpts, or pipes, and the helper relays between them and
//! berthd in the frames of [`exec_frame`] until the command exits.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
use nix::sys::signal::{SigHandler, Signal, signal};
use nix::sys::signalfd::SignalFd;
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Pid, dup2_stderr, dup2_stdin, dup2_stdout, pipe2, setsid};

use super::exec_frame;
use super::{Step, StepError};

/// How a streaming exec's command gets its stdio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StreamMode {
    Pipes { stdin: bool },
    Tty { stdin: bool },
}

impl StreamMode {
    /// The mode berthd asked for in the environment; None for ExecSync.
    pub(super) fn from_env() -> Option<StreamMode> {
        let stdin = std::env::var(exec_frame::STDIN_ENV).is_ok_and(|v| v == "1");
        match std::env::var(exec_frame::MODE_ENV).ok()?.as_str() {
            exec_frame::MODE_PIPES => Some(StreamMode::Pipes { stdin }),
            exec_frame::MODE_TTY => Some(StreamMode::Tty { stdin }),
            _ => None,
        }
    }
}

/// Both ends of a streaming command's stdio: the child's and the relay's.
pub(super) struct StreamStdio {
    tty: bool,
    /// The child's stdin, stdout and stderr (the terminal's slave, thrice).
    child: [OwnedFd; 3],
    /// Where the relay writes the command's input, if it gets any.
    input: Option<OwnedFd>,
    /// What the relay reads: (frame kind, fd).
    outputs: Vec<(u8, OwnedFd)>,
    /// The terminal's master, for resizes.
    master: Option<OwnedFd>,
}

impl StreamStdio {
    /// Opens the stdio; run inside the container's mount namespace, so a
    /// terminal comes from the container's devpts (/dev/ptmx links there).
    pub(super) fn open(mode: StreamMode) -> Result<StreamStdio, StepError> {
        let pipe = || pipe2(OFlag::O_CLOEXEC).step(|| "pipe".into());
        let nonblocking = |fd: &OwnedFd| fcntl(fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).map(drop);
        match mode {
            StreamMode::Tty { stdin } => {
                let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
                    .step(|| "open the container's /dev/ptmx".into())?;
                grantpt(&master).step(|| "grantpt".into())?;
                unlockpt(&master).step(|| "unlockpt".into())?;
                let name = ptsname_r(&master).step(|| "ptsname".into())?;
                let slave = nix::fcntl::open(
                    Path::new(&name),
                    OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .step(|| format!("open {name}"))?;
                let master = OwnedFd::from(master);
                nonblocking(&master).step(|| "set O_NONBLOCK".into())?;
                let dup = |fd: &OwnedFd| fd.try_clone().step(|| "dup the terminal".into());
                Ok(StreamStdio {
                    tty: true,
                    child: [dup(&slave)?, dup(&slave)?, slave],
                    input: if stdin { Some(dup(&master)?) } else { None },
                    outputs: vec![(exec_frame::STDOUT, dup(&master)?)],
                    master: Some(master),
                })
            }
            StreamMode::Pipes { stdin } => {
                // Without input the command reads EOF at once.
                let (in_r, in_w) = pipe()?;
                let (out_r, out_w) = pipe()?;
                let (err_r, err_w) = pipe()?;
                let input = if stdin { Some(in_w) } else { None };
                for fd in input.iter().chain([&out_r, &err_r]) {
                    nonblocking(fd).step(|| "set O_NONBLOCK".into())?;
                }
                Ok(StreamStdio {
                    tty: false,
                    child: [in_r, out_w, err_w],
                    input,
                    outputs: vec![(exec_frame::STDOUT, out_r), (exec_frame::STDERR, err_r)],
                    master: None,
                })
            }
        }
    }

    /// In the forked child: the stdio becomes 0, 1 and 2, and a terminal the
    /// controlling terminal of a new session.
    pub(super) fn install(self) -> Result<(), StepError> {
        // berthd, a Rust program, ignores SIGPIPE, and an ignored signal
        // stays ignored across exec: `yes | head` would never end.
        // SAFETY: SIG_DFL installs no handler, and this forked child runs
        // nothing else at the same time.
        unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) }.step(|| "reset SIGPIPE".into())?;
        if self.tty {
            setsid().step(|| "setsid".into())?;
        }
        let [stdin, stdout, stderr] = &self.child;
        dup2_stdin(stdin).step(|| "set stdin".into())?;
        dup2_stdout(stdout).step(|| "set stdout".into())?;
        dup2_stderr(stderr).step(|| "set stderr".into())?;
        if self.tty {
            // SAFETY: TIOCSCTTY takes an int argument (0: do not steal) and no pointers.
            let rc = unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error())
                    .step(|| "make the terminal the controlling terminal".into());
            }
        }
        Ok(())
    }
}

/// Most input held for a command that does not read it; beyond it the relay
/// stops reading from berthd.
const MAX_INPUT_PENDING: usize = 256 * 1024;

/// Relays until the command has exited and its exec is reported on
/// `errors`; returns its exit code and the exec error text (empty if none).
pub(super) fn relay(
    stdio: StreamStdio,
    child: Pid,
    signals: &SignalFd,
    errors: &File,
) -> Result<(i32, Vec<u8>), StepError> {
    // The child's ends go, so EOF and EIO mean what they say.
    drop(stdio.child);
    let mut relay = Relay {
        input: stdio.input,
        input_pending: Vec::new(),
        input_closing: false,
        outputs: stdio.outputs,
        master: stdio.master,
        from_berthd: true,
        frames: Vec::new(),
    };
    relay.run(child, signals, errors)
}

struct Relay {
    input: Option<OwnedFd>,
    input_pending: Vec<u8>,
    /// Close the input once the pending part is written.
    input_closing: bool,
    outputs: Vec<(u8, OwnedFd)>,
    master: Option<OwnedFd>,
    /// berthd still sends frames.
    from_berthd: bool,
    frames: Vec<u8>,
}

impl Relay {
    fn run(
        &mut self,
        child: Pid,
        signals: &SignalFd,
        errors: &File,
    ) -> Result<(i32, Vec<u8>), StepError> {
        let stdin = std::io::stdin();
        let from_berthd = stdin.as_fd();
        let mut message = Vec::new();
        let mut errors_open = true;
        let mut status = None;
        loop {
            if let Some(code) = status
                && !errors_open
            {
                // Only what is written already: a daemonized child may hold
                // the output open forever.
                while self.read_outputs()? {}
                return Ok((code, message));
            }
            let mut fds = vec![PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
            let err_at = push_if(&mut fds, errors_open, errors.as_fd(), PollFlags::POLLIN);
            let berthd_at = push_if(
                &mut fds,
                self.from_berthd && self.input_pending.len() < MAX_INPUT_PENDING,
                from_berthd,
                PollFlags::POLLIN,
            );
            let outputs_at = fds.len();
            for (_, fd) in &self.outputs {
                fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
            }
            let input_at = match &self.input {
                Some(fd) if !self.input_pending.is_empty() => {
                    push_if(&mut fds, true, fd.as_fd(), PollFlags::POLLOUT)
                }
                _ => None,
            };
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(e).step(|| "poll".into()),
            }
            let ready = |i: usize| fds[i].revents().is_some_and(|r| !r.is_empty());
            let output_ready = (outputs_at..outputs_at + self.outputs.len()).any(ready);
            let (err_ready, berthd_ready, input_ready, sig_ready) = (
                err_at.is_some_and(ready),
                berthd_at.is_some_and(ready),
                input_at.is_some_and(ready),
                ready(0),
            );
            drop(fds);
            if output_ready {
                self.read_outputs()?;
            }
            if berthd_ready {
                self.read_berthd(from_berthd)?;
            }
            if input_ready {
                self.write_input();
            }
            if err_ready {
                let mut buf = [0u8; 4096];
                match nix::unistd::read(errors, &mut buf) {
                    Ok(0) => errors_open = false,
                    Ok(n) => message.extend_from_slice(&buf[..n]),
                    Err(Errno::EINTR) => {}
                    Err(_) => errors_open = false,
                }
            }
            if sig_ready {
                let _ = signals.read_signal();
            }
            if status.is_none() {
                match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(_, code)) => status = Some(code),
                    Ok(WaitStatus::Signaled(_, signal, _)) => status = Some(128 + signal as i32),
                    Ok(_) => {}
                    Err(e) => return Err(e).step(|| "wait for the command".into()),
                }
            }
        }
    }

    /// Reads each output once and sends what it had; true if anything was read.
    fn read_outputs(&mut self) -> Result<bool, StepError> {
        let mut buf = vec![0u8; exec_frame::CHUNK];
        let mut any = false;
        let mut ended = Vec::new();
        for (i, (kind, fd)) in self.outputs.iter().enumerate() {
            match nix::unistd::read(fd, &mut buf) {
                Ok(0) => ended.push(i),
                Ok(n) => {
                    any = true;
                    send_frame(*kind, &buf[..n])?;
                }
                Err(Errno::EAGAIN | Errno::EINTR) => {}
                // EIO: the terminal's last slave is closed.
                Err(_) => ended.push(i),
            }
        }
        for i in ended.into_iter().rev() {
            self.outputs.remove(i);
        }
        Ok(any)
    }

    /// Reads frames from berthd: input, its end, terminal sizes.
    fn read_berthd(&mut self, from_berthd: BorrowedFd<'_>) -> Result<(), StepError> {
        let mut buf = vec![0u8; 64 * 1024];
        match nix::unistd::read(from_berthd, &mut buf) {
            Ok(0) => {
                self.from_berthd = false;
                self.close_input();
                return Ok(());
            }
            Ok(n) => self.frames.extend_from_slice(&buf[..n]),
            Err(Errno::EAGAIN | Errno::EINTR) => return Ok(()),
            Err(e) => return Err(e).step(|| "read from berthd".into()),
        }
        while let Some((kind, payload)) = exec_frame::take(&mut self.frames)
            .map_err(|e| StepError::msg("frame from berthd", e))?
        {
            match kind {
                exec_frame::STDIN if self.input.is_some() && !self.input_closing => {
                    self.input_pending.extend_from_slice(&payload);
                    self.write_input();
                }
                exec_frame::STDIN_CLOSE => self.close_input(),
                exec_frame::RESIZE => {
                    if let (Some(master), Some((width, height))) =
                        (&self.master, exec_frame::parse_resize(&payload))
                    {
                        let _ = super::attach::set_terminal_size(
                            master,
                            u32::from(width),
                            u32::from(height),
                        );
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The command's input ends. A terminal stays open: its input cannot end
    /// apart from its output (containerd does the same).
    fn close_input(&mut self) {
        if self.master.is_some() {
            return;
        }
        self.input_closing = true;
        if self.input_pending.is_empty() {
            self.input = None;
        }
    }

    fn write_input(&mut self) {
        let Some(input) = &self.input else {
            self.input_pending.clear();
            return;
        };
        while !self.input_pending.is_empty() {
            match nix::unistd::write(input, &self.input_pending) {
                Ok(n) => {
                    self.input_pending.drain(..n);
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return,
                // EPIPE and the like: nobody reads the input any more.
                Err(_) => {
                    self.input_pending.clear();
                    self.input = None;
                    return;
                }
            }
        }
        if self.input_closing {
            self.input = None;
        }
    }
}

/// Adds `fd` to the poll set when `cond`; returns its index.
fn push_if<'fd>(
    fds: &mut Vec<PollFd<'fd>>,
    cond: bool,
    fd: BorrowedFd<'fd>,
    events: PollFlags,
) -> Option<usize> {
    cond.then(|| {
        fds.push(PollFd::new(fd, events));
        fds.len() - 1
    })
}

/// Writes one frame to berthd (our stdout), all of it.
fn send_frame(kind: u8, data: &[u8]) -> Result<(), StepError> {
    let mut frame = Vec::with_capacity(5 + data.len());
    exec_frame::encode(kind, data, &mut frame);
    let out = std::io::stdout();
    let fd = out.as_fd();
    let mut sent = 0;
    while sent < frame.len() {
        match nix::unistd::write(fd, &frame[sent..]) {
            Ok(n) => sent += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e).step(|| "write to berthd".into()),
        }
    }
    Ok(())
}
