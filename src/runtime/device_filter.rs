//! The device cgroup of cgroup v2: an eBPF program of type
//! BPF_PROG_TYPE_CGROUP_DEVICE, generated from the allow rules (as runc's
//! devicefilter does), loaded and attached to the container's cgroup. The
//! kernel runs it on every open and mknod of a device node; it answers 1 to
//! allow, 0 to deny. The program lives as long as the cgroup it is attached
//! to: removing the cgroup frees it, so there is nothing else to clean up.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::devices::DeviceRule;

#[derive(Debug, thiserror::Error)]
pub enum DeviceFilterError {
    #[error("device number {0} does not fit a BPF immediate")]
    Number(u64),
    #[error("open cgroup {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("load the device filter for {path}: {source}; verifier log: {log}")]
    Load {
        path: PathBuf,
        source: std::io::Error,
        log: String,
    },
    #[error("attach the device filter to {path}: {source}")]
    Attach {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    pub dst: u8,
    pub src: u8,
    pub off: i16,
    pub imm: i32,
}

impl Insn {
    /// The kernel's layout: code, dst in the low nibble and src in the high
    /// one (little-endian bitfields), offset, immediate.
    fn encode(&self) -> [u8; 8] {
        let off = self.off.to_le_bytes();
        let imm = self.imm.to_le_bytes();
        [
            self.code,
            (self.dst & 0xf) | (self.src << 4),
            off[0],
            off[1],
            imm[0],
            imm[1],
            imm[2],
            imm[3],
        ]
    }
}

// Opcodes (linux/bpf.h, bpf_common.h) of the instructions the filter uses.
pub const LDX_MEM_W: u8 = 0x61;
pub const ALU32_AND_K: u8 = 0x54;
pub const ALU32_RSH_K: u8 = 0x74;
pub const ALU32_MOV_K: u8 = 0xb4;
pub const ALU32_MOV_X: u8 = 0xbc;
pub const JMP_JNE_K: u8 = 0x55;
pub const JMP_JNE_X: u8 = 0x5d;
pub const JMP_EXIT: u8 = 0x95;

// `struct bpf_cgroup_dev_ctx` and its values.
const DEV_BLOCK: i32 = 1;
const DEV_CHAR: i32 = 2;
const ACC_MKNOD: i32 = 1;
const ACC_READ: i32 = 2;
const ACC_WRITE: i32 = 4;

// Registers: R0 the verdict, R1 the context; then the request's fields.
const R0: u8 = 0;
const R1: u8 = 1;
const TYPE: u8 = 2;
const ACCESS: u8 = 3;
const MAJOR: u8 = 4;
const MINOR: u8 = 5;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        dst,
        src,
        off,
        imm,
    }
}

fn access_bits(access: &str) -> i32 {
    access.chars().fold(0, |bits, c| {
        bits | match c {
            'm' => ACC_MKNOD,
            'r' => ACC_READ,
            'w' => ACC_WRITE,
            _ => 0,
        }
    })
}

fn number(n: u64) -> Result<i32, DeviceFilterError> {
    i32::try_from(n).map_err(|_| DeviceFilterError::Number(n))
}

/// The program allowing exactly `rules` and denying every other access.
pub fn program(rules: &[DeviceRule]) -> Result<Vec<Insn>, DeviceFilterError> {
    // The request: type in the low 16 bits of access_type, access in the high.
    let mut out = vec![
        insn(LDX_MEM_W, TYPE, R1, 0, 0),
        insn(ALU32_AND_K, TYPE, 0, 0, 0xffff),
        insn(LDX_MEM_W, ACCESS, R1, 0, 0),
        insn(ALU32_RSH_K, ACCESS, 0, 0, 16),
        insn(LDX_MEM_W, MAJOR, R1, 4, 0),
        insn(LDX_MEM_W, MINOR, R1, 8, 0),
    ];
    for rule in rules {
        // Each check jumps past the rule's block when the request differs;
        // the offsets are filled in once the block's length is known.
        let mut block = Vec::new();
        match rule.kind {
            'c' => block.push(insn(JMP_JNE_K, TYPE, 0, 0, DEV_CHAR)),
            'b' => block.push(insn(JMP_JNE_K, TYPE, 0, 0, DEV_BLOCK)),
            _ => {}
        }
        let bits = access_bits(&rule.access);
        if bits != ACC_MKNOD | ACC_READ | ACC_WRITE {
            // Allowed only if the request asks for no more than the rule.
            block.push(insn(ALU32_MOV_X, R1, ACCESS, 0, 0));
            block.push(insn(ALU32_AND_K, R1, 0, 0, bits));
            block.push(insn(JMP_JNE_X, R1, ACCESS, 0, 0));
        }
        if let Some(major) = rule.major {
            block.push(insn(JMP_JNE_K, MAJOR, 0, 0, number(major)?));
        }
        if let Some(minor) = rule.minor {
            block.push(insn(JMP_JNE_K, MINOR, 0, 0, number(minor)?));
        }
        let checks = block.len();
        for (i, check) in block.iter_mut().enumerate() {
            // A jump goes past the remaining checks and the two instructions
            // of the verdict; other instructions must keep a zero offset.
            if matches!(check.code, JMP_JNE_K | JMP_JNE_X) {
                check.off = i16::try_from(checks - i + 1).unwrap_or(i16::MAX);
            }
        }
        block.push(insn(ALU32_MOV_K, R0, 0, 0, 1));
        block.push(insn(JMP_EXIT, 0, 0, 0, 0));
        out.extend(block);
    }
    out.push(insn(ALU32_MOV_K, R0, 0, 0, 0));
    out.push(insn(JMP_EXIT, 0, 0, 0, 0));
    Ok(out)
}

// bpf(2) commands, program and attach types, flags (linux/bpf.h).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
/// Other programs may sit on the same cgroup and its ancestors (kubelet's,
/// or a parent's); all of them must allow an access.
const BPF_F_ALLOW_MULTI: u32 = 2;

/// The leading fields of `union bpf_attr` for BPF_PROG_LOAD; the kernel
/// takes a shorter attr and treats the rest as zero.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// `union bpf_attr` for BPF_PROG_ATTACH.
#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: attr is a live, initialised #[repr(C)] prefix of bpf_attr of the
    // size passed, and every pointer in it points at memory that outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Loads `insns`; on failure loads again with the verifier's log, to say why.
fn load(insns: &[Insn], cgroup: &Path) -> Result<OwnedFd, DeviceFilterError> {
    let code: Vec<[u8; 8]> = insns.iter().map(Insn::encode).collect();
    let license = c"Apache";
    let mut name = [0u8; 16];
    name[..10].copy_from_slice(b"berth_devs");
    let attr = |log: &mut Vec<u8>| ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: u32::try_from(code.len()).unwrap_or(u32::MAX),
        insns: code.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: u32::from(!log.is_empty()),
        log_size: u32::try_from(log.len()).unwrap_or(u32::MAX),
        log_buf: if log.is_empty() {
            0
        } else {
            log.as_mut_ptr() as u64
        },
        prog_name: name,
        ..Default::default()
    };
    let first = match bpf(BPF_PROG_LOAD, &mut attr(&mut Vec::new())) {
        // SAFETY: a successful BPF_PROG_LOAD returns a new fd that nothing else owns.
        Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) }),
        Err(e) => e,
    };
    let mut log = vec![0u8; 256 * 1024];
    let _ = bpf(BPF_PROG_LOAD, &mut attr(&mut log));
    let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
    Err(DeviceFilterError::Load {
        path: cgroup.to_path_buf(),
        source: first,
        log: String::from_utf8_lossy(&log[..end]).trim().to_string(),
    })
}

/// Loads the filter allowing `rules` and attaches it to the v2 cgroup `dir`.
pub fn attach(dir: &Path, rules: &[DeviceRule]) -> Result<(), DeviceFilterError> {
    let insns = program(rules)?;
    let cgroup = File::open(dir).map_err(|source| DeviceFilterError::Open {
        path: dir.to_path_buf(),
        source,
    })?;
    let prog = load(&insns, dir)?;
    let mut attr = ProgAttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
    };
    bpf(BPF_PROG_ATTACH, &mut attr).map_err(|source| DeviceFilterError::Attach {
        path: dir.to_path_buf(),
        source,
    })?;
    tracing::debug!(cgroup = %dir.display(), instructions = insns.len(), "device filter attached");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};

    /// Runs a filter on one request, for the instructions `program` emits.
    fn run(insns: &[Insn], kind: u32, access: u32, major: u32, minor: u32) -> u64 {
        let ctx = [kind | (access << 16), major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        for _ in 0..10_000 {
            let i = insns[pc];
            let (d, s) = (usize::from(i.dst), usize::from(i.src));
            pc += 1;
            match i.code {
                LDX_MEM_W => {
                    assert_eq!(s, 1, "loads read the context");
                    r[d] = u64::from(ctx[usize::try_from(i.off).expect("offset") / 4]);
                }
                ALU32_AND_K => r[d] = u64::from(r[d] as u32 & i.imm as u32),
                ALU32_RSH_K => r[d] = u64::from(r[d] as u32 >> i.imm),
                ALU32_MOV_K => r[d] = u64::from(i.imm as u32),
                ALU32_MOV_X => r[d] = u64::from(r[s] as u32),
                JMP_JNE_K | JMP_JNE_X => {
                    let other = if i.code == JMP_JNE_K {
                        i64::from(i.imm) as u64
                    } else {
                        r[s]
                    };
                    if r[d] != other {
                        pc = pc
                            .checked_add_signed(isize::from(i.off))
                            .expect("jump in range");
                    }
                }
                JMP_EXIT => return r[0],
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
        panic!("no exit");
    }

    /// What the rules mean, the device cgroup v1 way.
    fn allowed(rules: &[DeviceRule], kind: char, access: &str, major: u64, minor: u64) -> bool {
        rules.iter().any(|r| {
            (r.kind == 'a' || r.kind == kind)
                && r.major.is_none_or(|m| m == major)
                && r.minor.is_none_or(|m| m == minor)
                && access.chars().all(|c| r.access.contains(c))
        })
    }

    fn rules() -> Vec<DeviceRule> {
        let mut rules = crate::runtime::devices::default_rules();
        rules.push(DeviceRule {
            kind: 'c',
            major: Some(10),
            minor: Some(200),
            access: "rw".into(),
        });
        rules.push(DeviceRule {
            kind: 'b',
            major: Some(8),
            minor: None,
            access: "r".into(),
        });
        rules
    }

    #[test]
    fn the_program_decides_as_the_rules_say() {
        let rules = rules();
        let insns = program(&rules).expect("program");
        let accesses = ["m", "r", "w", "rw", "rm", "wm", "rwm"];
        let mut checked = 0;
        for (kind, kind_bits) in [('c', 2), ('b', 1)] {
            for major in [1, 5, 8, 10, 136, 254] {
                for minor in [0, 1, 3, 5, 9, 200, 229] {
                    for access in accesses {
                        let bits = access_bits(access) as u32;
                        let got = run(&insns, kind_bits, bits, major, minor);
                        let want = allowed(&rules, kind, access, major.into(), minor.into());
                        assert_eq!(
                            got == 1,
                            want,
                            "{kind} {major}:{minor} {access}: program says {got}"
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, 2 * 6 * 7 * 7);
        // Spot checks of the meaning itself.
        assert_eq!(run(&insns, 2, 6, 10, 200), 1, "tun rw");
        assert_eq!(run(&insns, 2, 3, 10, 200), 0, "tun read and mknod at once");
        assert_eq!(run(&insns, 2, 1, 10, 229), 1, "mknod of any char device");
        assert_eq!(run(&insns, 2, 2, 10, 229), 0, "fuse read");
        assert_eq!(run(&insns, 1, 2, 8, 17), 1, "sdb1 read");
        assert_eq!(run(&insns, 1, 4, 8, 17), 0, "sdb1 write");
    }

    #[test]
    fn instructions_encode_as_the_kernel_lays_them_out() {
        let i = insn(LDX_MEM_W, MAJOR, R1, 4, 0);
        assert_eq!(i.encode(), [0x61, 0x14, 4, 0, 0, 0, 0, 0]);
        let j = insn(JMP_JNE_K, TYPE, 0, 3, DEV_CHAR);
        assert_eq!(j.encode(), [0x55, 0x02, 3, 0, 2, 0, 0, 0]);
        assert!(matches!(
            program(&[DeviceRule {
                kind: 'c',
                major: Some(1 << 40),
                minor: None,
                access: "r".into(),
            }]),
            Err(DeviceFilterError::Number(_))
        ));
    }

    /// This host's v2 hierarchy (beside v1 here, or alone elsewhere).
    fn v2_mount() -> PathBuf {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        mountinfo
            .lines()
            .find_map(|line| {
                let (left, right) = line.split_once(" - ")?;
                let point = left.split(' ').nth(4)?;
                (right.split(' ').next()? == "cgroup2").then(|| PathBuf::from(point))
            })
            .expect("a cgroup2 mount")
    }

    /// The kernel verifies and runs the program: in a v2 cgroup with it, a
    /// shell opens the listed tun device and is refused the unlisted fuse.
    #[test]
    fn the_kernel_runs_the_filter() {
        // Without the filter, root opens fuse.
        let control = Command::new("sh")
            .args(["-c", "true < /dev/fuse && echo fuse=ok"])
            .output()
            .expect("sh");
        assert_eq!(String::from_utf8_lossy(&control.stdout), "fuse=ok\n");
        let dir = v2_mount().join(format!("berth-devfilter-{}", std::process::id()));
        std::fs::create_dir(&dir).expect("v2 cgroup");
        let result = attach(&dir, &rules());
        let mut child = Command::new("sh")
            .args([
                "-c",
                "read go; true < /dev/net/tun && echo tun=ok; true < /dev/fuse && echo fuse=ok; \
                 echo done",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("sh");
        let joined = std::fs::write(dir.join("cgroup.procs"), child.id().to_string());
        let mut stdin = child.stdin.take().expect("stdin");
        let _ = writeln!(stdin, "go");
        let lines: Vec<String> = BufReader::new(child.stdout.take().expect("stdout"))
            .lines()
            .map_while(Result::ok)
            .collect();
        let _ = child.wait();
        let removed = std::fs::remove_dir(&dir);
        result.expect("attach");
        joined.expect("join the v2 cgroup");
        removed.expect("remove the v2 cgroup");
        assert_eq!(lines, ["tun=ok", "done"]);
    }
}
