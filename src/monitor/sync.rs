//! The channel between a monitor and the container init it forked: a
//! SOCK_SEQPACKET socketpair (message boundaries kept, file descriptors can
//! travel), close-on-exec on both ends, so the monitor sees EOF exactly when
//! the init's exec succeeded or the init died.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};

use super::{Step, StepError};

/// Longest text a message carries (an error message).
const MAX_MESSAGE: usize = 4096;

/// What the init tells the monitor.
#[derive(Debug)]
pub(crate) enum FromInit {
    /// The master side of the container's terminal (before Ready).
    Pty(OwnedFd),
    /// Created: set up fully, waiting for Start.
    Ready,
    /// Setup failed; the init exits.
    SetupError(String),
    /// Exec failed after Start; the init exits.
    ExecError(String),
    /// The init forked its successor, PID 1 of a pid namespace it made,
    /// with this pid (in the monitor's namespace), and exits.
    Pid(i32),
}

/// What the monitor tells the init.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FromMonitor {
    /// The init is in its cgroups: go on with the setup.
    Proceed,
    /// Exec the container process.
    Start,
}

const PTY: u8 = 1;
const READY: u8 = 2;
const SETUP_ERROR: u8 = 3;
const EXEC_ERROR: u8 = 4;
const PID: u8 = 5;
const PROCEED: u8 = 10;
const START: u8 = 11;

/// A received message: tag, text, and the descriptor it carried.
type RawMessage = (u8, Vec<u8>, Option<OwnedFd>);

#[derive(Debug)]
pub(crate) struct SyncSocket(OwnedFd);

impl SyncSocket {
    /// A connected pair: (monitor end, init end).
    pub(crate) fn pair() -> Result<(SyncSocket, SyncSocket), StepError> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .step(|| "socketpair for the init".into())?;
        Ok((SyncSocket(a), SyncSocket(b)))
    }

    pub(crate) fn fd(&self) -> &OwnedFd {
        &self.0
    }

    pub(crate) fn send_to_init(&self, message: FromMonitor) -> Result<(), StepError> {
        let tag = match message {
            FromMonitor::Proceed => PROCEED,
            FromMonitor::Start => START,
        };
        self.send(tag, &[], None)
    }

    pub(crate) fn send_to_monitor(&self, message: &FromInit) -> Result<(), StepError> {
        match message {
            FromInit::Pty(fd) => self.send(PTY, &[], Some(fd)),
            FromInit::Ready => self.send(READY, &[], None),
            FromInit::SetupError(text) => self.send(SETUP_ERROR, text.as_bytes(), None),
            FromInit::ExecError(text) => self.send(EXEC_ERROR, text.as_bytes(), None),
            FromInit::Pid(pid) => self.send(PID, pid.to_string().as_bytes(), None),
        }
    }

    /// The next message from the monitor; None once it is gone.
    pub(crate) fn recv_from_monitor(&self) -> Result<Option<FromMonitor>, StepError> {
        match self.recv()? {
            None => Ok(None),
            Some((PROCEED, _, _)) => Ok(Some(FromMonitor::Proceed)),
            Some((START, _, _)) => Ok(Some(FromMonitor::Start)),
            Some((tag, _, _)) => Err(StepError::msg(
                "message from the monitor",
                format!("unknown tag {tag}"),
            )),
        }
    }

    /// The next message from the init; None at EOF (exec succeeded or the
    /// init died).
    pub(crate) fn recv_from_init(&self) -> Result<Option<FromInit>, StepError> {
        let Some((tag, text, fd)) = self.recv()? else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&text).into_owned();
        match (tag, fd) {
            (PTY, Some(fd)) => Ok(Some(FromInit::Pty(fd))),
            (READY, _) => Ok(Some(FromInit::Ready)),
            (SETUP_ERROR, _) => Ok(Some(FromInit::SetupError(text))),
            (EXEC_ERROR, _) => Ok(Some(FromInit::ExecError(text))),
            (PID, _) => text
                .parse()
                .map(|pid| Some(FromInit::Pid(pid)))
                .map_err(|_| {
                    StepError::msg(
                        "message from the container init",
                        format!("bad pid {text:?}"),
                    )
                }),
            (tag, _) => Err(StepError::msg(
                "message from the container init",
                format!("unknown tag {tag}"),
            )),
        }
    }

    fn send(&self, tag: u8, text: &[u8], fd: Option<&OwnedFd>) -> Result<(), StepError> {
        let text = &text[..text.len().min(MAX_MESSAGE)];
        let tag = [tag];
        let iov = [IoSlice::new(&tag), IoSlice::new(text)];
        let fds;
        let cmsgs: &[ControlMessage] = match fd {
            Some(fd) => {
                fds = [fd.as_raw_fd()];
                &[ControlMessage::ScmRights(&fds)]
            }
            None => &[],
        };
        sendmsg::<()>(
            self.0.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .step(|| "send to the sync socket".into())?;
        Ok(())
    }

    fn recv(&self) -> Result<Option<RawMessage>, StepError> {
        let mut buf = vec![0u8; 1 + MAX_MESSAGE];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let (len, fd) = loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            match recvmsg::<()>(
                self.0.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => {
                    let mut fd = None;
                    for c in msg.cmsgs().step(|| "read a sync message's fds".into())? {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            for r in raw {
                                // SAFETY: the kernel just installed `r` in our table
                                // for this message; nothing else owns it.
                                let owned = unsafe { OwnedFd::from_raw_fd(r) };
                                fd.get_or_insert(owned);
                            }
                        }
                    }
                    break (msg.bytes, fd);
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e).step(|| "receive from the sync socket".into()),
            }
        };
        if len == 0 {
            return Ok(None);
        }
        buf.truncate(len);
        let tag = buf.remove(0);
        Ok(Some((tag, buf, fd)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_fds_cross_and_eof_is_seen() {
        let (monitor, init) = SyncSocket::pair().expect("pair");
        monitor
            .send_to_init(FromMonitor::Proceed)
            .expect("send proceed");
        assert_eq!(
            init.recv_from_monitor().expect("recv"),
            Some(FromMonitor::Proceed)
        );
        let (r, w) = nix::unistd::pipe().expect("pipe");
        init.send_to_monitor(&FromInit::Pty(r)).expect("send fd");
        init.send_to_monitor(&FromInit::ExecError("exec: \"x\": not found".into()))
            .expect("send error");
        let Some(FromInit::Pty(got)) = monitor.recv_from_init().expect("recv fd") else {
            panic!("expected an fd");
        };
        nix::unistd::write(&w, b"hi").expect("write");
        let mut buf = [0u8; 2];
        nix::unistd::read(&got, &mut buf).expect("read through passed fd");
        assert_eq!(&buf, b"hi");
        match monitor.recv_from_init().expect("recv") {
            Some(FromInit::ExecError(text)) => assert_eq!(text, "exec: \"x\": not found"),
            other => panic!("unexpected {other:?}"),
        }
        init.send_to_monitor(&FromInit::Pid(4242))
            .expect("send pid");
        match monitor.recv_from_init().expect("recv") {
            Some(FromInit::Pid(pid)) => assert_eq!(pid, 4242),
            other => panic!("unexpected {other:?}"),
        }
        drop(init);
        assert!(monitor.recv_from_init().expect("eof").is_none());
    }
}
