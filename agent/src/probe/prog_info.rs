//! What the kernel counts about a loaded program that aya does not expose.
//!
//! The kernel never nests tracing programs on one CPU: when a tracepoint fires while a
//! program is already running there (a softirq's TCP processing that interrupts a program
//! running in a process's `close()`), it skips the inner run and counts the skip in the
//! program's `bpf_prog_info.recursion_misses` (Linux 5.12+). A skipped state change may have
//! been a record the agent needed, so the probe reports these skips as a loss. aya 0.14's
//! `ProgramInfo` does not carry the field, so it is read here with `BPF_OBJ_GET_INFO_BY_FD`.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

/// `BPF_OBJ_GET_INFO_BY_FD` (uapi/linux/bpf.h, `enum bpf_cmd`).
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// `struct bpf_prog_info` up to and including `recursion_misses`, as 8-byte words. The kernel
/// fills as much of the struct as it is given, and accepts a longer buffer if the part it does
/// not know is zero: a kernel older than the field leaves it 0.
const INFO_WORDS: usize = 27;
/// Word index of `recursion_misses` (byte offset 208).
const RECURSION_MISSES: usize = 26;

/// The `info` member of `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// Runs of the program at `fd` that the kernel skipped because a program was already running
/// on the same CPU.
#[allow(unsafe_code)]
pub fn recursion_misses(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut info = [0u64; INFO_WORDS];
    let mut attr = InfoAttr {
        bpf_fd: u32::try_from(fd.as_raw_fd())
            .map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix of the size passed; the kernel writes at
    // most `info_len` bytes to `info`, which outlives the call, and writes `info_len` back
    // into `attr`, which is mutable.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &mut attr as *mut InfoAttr,
            std::mem::size_of::<InfoAttr>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info[RECURSION_MISSES])
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn a_file_that_is_not_a_bpf_object_is_an_error() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let e = recursion_misses(file.as_fd()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
    }
}
