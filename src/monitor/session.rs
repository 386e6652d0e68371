//! berthd's side of the interactive sessions: attaching to a container's
//! stdio through its monitor, and a streaming exec through `berthd exec-in`
//! (input, terminal sizes and output as they come, then the exit code).

use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};

use super::client::{MonitorConnection, helper_error};
use super::exec::EXIT_TIMEOUT;
use super::exec_frame;
use super::protocol::{self, pb};
use super::{ATTACH_PROTOCOL_VERSION, MonitorError};

/// Largest stdin chunk in one attach frame (frames are at most 64 KiB).
const ATTACH_CHUNK: usize = 32 * 1024;

/// A piece of a container's or command's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputChunk {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
}

/// Which of the container's streams an attach wants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttachStreams {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

impl MonitorConnection {
    /// Turns this connection into an attach session.
    pub async fn attach(
        mut self,
        streams: AttachStreams,
    ) -> Result<(AttachOutput, AttachInput), MonitorError> {
        if self.protocol_version() < ATTACH_PROTOCOL_VERSION {
            return Err(MonitorError::Refused {
                bundle: self.bundle().to_path_buf(),
                request: "attach",
                error: format!(
                    "the monitor speaks protocol {}, attach needs {ATTACH_PROTOCOL_VERSION}",
                    self.protocol_version()
                ),
            });
        }
        let request = pb::request::Kind::Attach(pb::AttachRequest {
            stdin: streams.stdin,
            stdout: streams.stdout,
            stderr: streams.stderr,
        });
        self.call(request, "attach").await?;
        let (bundle, stream) = self.into_parts();
        let (reader, writer) = stream.into_split();
        Ok((
            AttachOutput {
                bundle: bundle.clone(),
                reader,
                buf: Vec::new(),
            },
            AttachInput { bundle, writer },
        ))
    }
}

/// The container's output for one attach; ends when the container exits
/// (or the monitor drops this client).
#[derive(Debug)]
pub struct AttachOutput {
    bundle: PathBuf,
    reader: OwnedReadHalf,
    buf: Vec<u8>,
}

impl AttachOutput {
    /// The next chunk; None once the monitor closed the connection.
    pub async fn next(&mut self) -> Option<OutputChunk> {
        loop {
            match protocol::take_frame(&mut self.buf) {
                Ok(Some(body)) => match pb::AttachFrame::decode(body.as_slice()) {
                    Ok(pb::AttachFrame {
                        kind: Some(pb::attach_frame::Kind::Stdout(data)),
                    }) => return Some(OutputChunk::Stdout(data)),
                    Ok(pb::AttachFrame {
                        kind: Some(pb::attach_frame::Kind::Stderr(data)),
                    }) => return Some(OutputChunk::Stderr(data)),
                    // Kinds of a newer monitor.
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::warn!(bundle = %self.bundle.display(), error = %e, "bad attach frame");
                        return None;
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(bundle = %self.bundle.display(), error = %e, "bad attach frame");
                    return None;
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.reader.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// Input and terminal sizes for one attach.
#[derive(Debug)]
pub struct AttachInput {
    bundle: PathBuf,
    writer: OwnedWriteHalf,
}

impl AttachInput {
    pub async fn stdin(&mut self, data: &[u8]) -> Result<(), MonitorError> {
        for chunk in data.chunks(ATTACH_CHUNK) {
            self.send(pb::attach_frame::Kind::Stdin(chunk.to_vec()))
                .await?;
        }
        Ok(())
    }

    /// This client's input has ended (stdin_once closes the container's).
    pub async fn close_stdin(&mut self) -> Result<(), MonitorError> {
        self.send(pb::attach_frame::Kind::CloseStdin(pb::CloseStdin {}))
            .await
    }

    pub async fn resize(&mut self, width: u16, height: u16) -> Result<(), MonitorError> {
        self.send(pb::attach_frame::Kind::Resize(pb::TerminalSize {
            width: u32::from(width),
            height: u32::from(height),
        }))
        .await
    }

    async fn send(&mut self, kind: pb::attach_frame::Kind) -> Result<(), MonitorError> {
        let frame = protocol::encode_frame(&pb::AttachFrame { kind: Some(kind) });
        self.writer
            .write_all(&frame)
            .await
            .map_err(|source| MonitorError::Io {
                bundle: self.bundle.clone(),
                source,
            })
    }
}

/// How a streaming exec runs its command.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExecStreams {
    /// The command reads input from the client.
    pub stdin: bool,
    /// The command runs on a terminal (all its output is stdout).
    pub tty: bool,
}

/// A command running in a container for a streaming Exec; dropping it kills
/// the command.
#[derive(Debug)]
pub struct StreamingExec {
    pub input: ExecInput,
    pub output: ExecOutputStream,
    pub process: ExecProcess,
}

/// Starts `args` in the container whose init is `init_pid`, through
/// `exe exec-in` in streaming mode.
pub async fn exec_stream(
    exe: &Path,
    bundle: &Path,
    init_pid: i32,
    args: &[String],
    streams: ExecStreams,
) -> Result<StreamingExec, MonitorError> {
    if args.is_empty() {
        return Err(MonitorError::ExecStart("no command given".into()));
    }
    let mut cmd = Command::new(exe);
    cmd.arg("exec-in")
        .arg("--bundle")
        .arg(bundle)
        .arg("--init-pid")
        .arg(init_pid.to_string())
        .arg("--")
        .args(args)
        .env(
            exec_frame::MODE_ENV,
            if streams.tty {
                exec_frame::MODE_TTY
            } else {
                exec_frame::MODE_PIPES
            },
        )
        .env(exec_frame::STDIN_ENV, if streams.stdin { "1" } else { "0" })
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let spawn_err = |source| MonitorError::Spawn {
        exe: exe.to_path_buf(),
        source,
    };
    let mut child = cmd.spawn().map_err(spawn_err)?;
    let missing = || spawn_err(io::Error::other("exec-in without its pipes"));
    let stdin = child.stdin.take().ok_or_else(missing)?;
    let stdout = child.stdout.take().ok_or_else(missing)?;
    let stderr = child.stderr.take().ok_or_else(missing)?;
    Ok(StreamingExec {
        input: ExecInput { stdin: Some(stdin) },
        output: ExecOutputStream {
            stdout,
            buf: Vec::new(),
        },
        process: ExecProcess {
            exe: exe.to_path_buf(),
            child,
            stderr,
        },
    })
}

/// The command's input and terminal size.
#[derive(Debug)]
pub struct ExecInput {
    stdin: Option<ChildStdin>,
}

impl ExecInput {
    pub async fn write(&mut self, data: &[u8]) -> io::Result<()> {
        for chunk in data.chunks(exec_frame::CHUNK) {
            self.send(exec_frame::STDIN, chunk).await?;
        }
        Ok(())
    }

    /// The command's input ends (no effect on a terminal).
    pub async fn close(&mut self) -> io::Result<()> {
        self.send(exec_frame::STDIN_CLOSE, &[]).await
    }

    pub async fn resize(&mut self, width: u16, height: u16) -> io::Result<()> {
        self.send(
            exec_frame::RESIZE,
            &exec_frame::resize_payload(width, height),
        )
        .await
    }

    async fn send(&mut self, kind: u8, payload: &[u8]) -> io::Result<()> {
        let Some(stdin) = self.stdin.as_mut() else {
            return Err(io::ErrorKind::BrokenPipe.into());
        };
        let mut frame = Vec::with_capacity(5 + payload.len());
        exec_frame::encode(kind, payload, &mut frame);
        let result = stdin.write_all(&frame).await;
        if result.is_err() {
            self.stdin = None;
        }
        result
    }
}

/// The command's output as it comes.
#[derive(Debug)]
pub struct ExecOutputStream {
    stdout: ChildStdout,
    buf: Vec<u8>,
}

impl ExecOutputStream {
    /// The next chunk; None once the helper has finished (or broke the framing).
    pub async fn next(&mut self) -> Option<OutputChunk> {
        loop {
            match exec_frame::take(&mut self.buf) {
                Ok(Some((exec_frame::STDOUT, data))) => return Some(OutputChunk::Stdout(data)),
                Ok(Some((exec_frame::STDERR, data))) => return Some(OutputChunk::Stderr(data)),
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "bad frame from exec-in");
                    return None;
                }
            }
            let mut chunk = vec![0u8; 64 * 1024];
            match self.stdout.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// The helper process, for its exit code.
#[derive(Debug)]
pub struct ExecProcess {
    exe: PathBuf,
    child: Child,
    stderr: ChildStderr,
}

impl ExecProcess {
    /// Waits for the command's exit code. A failure of the helper itself
    /// (e.g. the executable is not found) is `ExecStart` with its message.
    pub async fn wait(mut self) -> Result<i32, MonitorError> {
        let mut stderr = Vec::new();
        let mut limited = (&mut self.stderr).take(64 * 1024);
        let (_, status) = tokio::join!(limited.read_to_end(&mut stderr), self.child.wait());
        let status = status.map_err(|source| MonitorError::Spawn {
            exe: self.exe.clone(),
            source,
        })?;
        let exit_code = match status.code() {
            Some(code) => code,
            None => 128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0),
        };
        if let Some(message) = helper_error(exit_code, &stderr)
            && exit_code != EXIT_TIMEOUT
        {
            return Err(MonitorError::ExecStart(message));
        }
        Ok(exit_code)
    }
}
