//! Just enough of `bpf(2)` for the steering program (`steer`): encoding eBPF instructions,
//! loading a socket-filter program, creating an LRU hash map. Hand-encoded, because the one
//! program is 37 instructions (39 slots) and a BPF toolchain (clang, libbpf, aya) would be a
//! build dependency bigger than the program.
#![allow(unsafe_code)]

// `struct bpf_insn` puts the destination register in the low nibble on little-endian hosts
// only; `asm` encodes that order.
#[cfg(target_endian = "big")]
compile_error!("bpf.rs encodes eBPF instructions for little-endian hosts only");

use std::io;
use std::mem::size_of;
use std::os::fd::{FromRawFd, OwnedFd};

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BpfInsn {
    code: u8,
    /// dst register in the low nibble, src in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

/// The prefix of `union bpf_attr` that `BPF_PROG_LOAD` reads; the kernel treats the missing
/// tail as zero.
#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
}

/// The prefix of `union bpf_attr` that `BPF_MAP_CREATE` reads.
#[repr(C)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;

/// Loads `insns` as a socket-filter program (licence: the project's own, so no GPL-only
/// helper may be used).
pub fn load_socket_filter(insns: &[BpfInsn]) -> io::Result<OwnedFd> {
    let license = c"Apache-2.0";
    let attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_SOCKET_FILTER,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
    };
    // SAFETY: a BPF_PROG_LOAD attribute whose pointers (instructions, license) outlive the
    // call.
    unsafe { bpf_fd(BPF_PROG_LOAD, &attr) }
}

/// A least-recently-used hash map of `max_entries` entries, `key_size` -> `value_size` bytes.
pub fn create_lru_hash(key_size: u32, value_size: u32, max_entries: u32) -> io::Result<OwnedFd> {
    let attr = MapCreate {
        map_type: BPF_MAP_TYPE_LRU_HASH,
        key_size,
        value_size,
        max_entries,
        map_flags: 0,
    };
    // SAFETY: a BPF_MAP_CREATE attribute, without pointers.
    unsafe { bpf_fd(BPF_MAP_CREATE, &attr) }
}

/// `bpf(2)` command `cmd` with attribute `attr`, for the commands that return a new
/// descriptor.
///
/// # Safety
/// `attr` must be the attribute layout `cmd` reads (a prefix of `union bpf_attr`; the kernel
/// takes the rest as zero), and every pointer in it valid for the call.
unsafe fn bpf_fd<T>(cmd: libc::c_long, attr: &T) -> io::Result<OwnedFd> {
    // SAFETY: the caller vouches for `attr`; the kernel reads `size_of::<T>()` bytes of it.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, size_of::<T>()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// The eBPF instruction forms the steering program uses (linux/bpf.h encodings).
pub mod asm {
    use super::BpfInsn;

    const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> BpfInsn {
        BpfInsn {
            code,
            regs: dst | src << 4,
            off,
            imm,
        }
    }
    /// dst = src (64-bit).
    pub const fn mov(dst: u8, src: u8) -> BpfInsn {
        insn(0xbf, dst, src, 0, 0)
    }
    /// dst = imm (64-bit).
    pub const fn mov_imm(dst: u8, imm: i32) -> BpfInsn {
        insn(0xb7, dst, 0, 0, imm)
    }
    /// dst += imm (64-bit).
    pub const fn add_imm(dst: u8, imm: i32) -> BpfInsn {
        insn(0x07, dst, 0, 0, imm)
    }
    /// dst -= src (64-bit).
    pub const fn sub(dst: u8, src: u8) -> BpfInsn {
        insn(0x1f, dst, src, 0, 0)
    }
    /// dst = *(u32 *)(src + off).
    pub const fn load32(dst: u8, src: u8, off: i16) -> BpfInsn {
        insn(0x61, dst, src, off, 0)
    }
    /// dst = *(u64 *)(src + off).
    pub const fn load64(dst: u8, src: u8, off: i16) -> BpfInsn {
        insn(0x79, dst, src, off, 0)
    }
    /// *(u32 *)(dst + off) = src.
    pub const fn store32(dst: u8, off: i16, src: u8) -> BpfInsn {
        insn(0x63, dst, src, off, 0)
    }
    /// *(u32 *)(dst + off) = imm.
    pub const fn store32_imm(dst: u8, off: i16, imm: i32) -> BpfInsn {
        insn(0x62, dst, 0, off, imm)
    }
    /// *(u64 *)(dst + off) = src.
    pub const fn store64(dst: u8, off: i16, src: u8) -> BpfInsn {
        insn(0x7b, dst, src, off, 0)
    }
    /// if dst == imm: skip `off` instructions.
    pub const fn jeq_imm(dst: u8, imm: i32, off: i16) -> BpfInsn {
        insn(0x15, dst, 0, off, imm)
    }
    /// if dst > imm (signed): skip `off` instructions.
    pub const fn jsgt_imm(dst: u8, imm: i32, off: i16) -> BpfInsn {
        insn(0x65, dst, 0, off, imm)
    }
    /// if dst <= imm (unsigned): skip `off` instructions.
    pub const fn jle_imm(dst: u8, imm: i32, off: i16) -> BpfInsn {
        insn(0xb5, dst, 0, off, imm)
    }
    /// r0 = helper(r1..r5); r1-r5 are clobbered, r6-r9 kept.
    pub const fn call(helper: i32) -> BpfInsn {
        insn(0x85, 0, 0, 0, helper)
    }
    pub const fn exit() -> BpfInsn {
        insn(0x95, 0, 0, 0, 0)
    }
    /// dst = the map with descriptor `fd` (a two-slot instruction, `BPF_PSEUDO_MAP_FD`).
    pub const fn load_map(dst: u8, fd: i32) -> [BpfInsn; 2] {
        [insn(0x18, dst, 1, 0, fd), insn(0, 0, 0, 0, 0)]
    }
    pub const MAP_LOOKUP_ELEM: i32 = 1;
    pub const MAP_UPDATE_ELEM: i32 = 2;
    pub const KTIME_GET_NS: i32 = 5;
    pub const GET_SMP_PROCESSOR_ID: i32 = 8;
}
