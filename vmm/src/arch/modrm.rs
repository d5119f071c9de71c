//! Decoding of the x86-64 instructions densevm completes for KVM's emulator whose
//! operand is in memory: legacy prefixes, REX, a two-byte `0f xx` opcode, then
//! ModRM, SIB and displacement, and the effective address they give.
//!
//! Only what [`super::mxcsr`] needs: 64-bit mode, a memory operand (ModRM.mod is
//! not 3), no operand-size or repeat prefix. Anything else decodes to `None`, so the
//! emulation failure is reported instead of guessed at.

use kvm_bindings::kvm_regs;

/// A segment override that changes the address in 64-bit mode (the others are
/// ignored there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// `fs` (`64` prefix).
    Fs,
    /// `gs` (`65` prefix): Linux's per-CPU data.
    Gs,
}

/// The base of a memory operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    /// A general-purpose register, by number (0 = rax ... 15 = r15).
    Gpr(u8),
    /// The address of the next instruction (`disp32(%rip)`).
    Rip,
}

/// A memory operand: `segment:disp(base, index, scale)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemOperand {
    /// Segment override, if it changes the address.
    pub segment: Option<Segment>,
    /// Base, if any.
    pub base: Option<Base>,
    /// Index register number and scale (1, 2, 4 or 8), if any.
    pub index: Option<(u8, u8)>,
    /// Sign-extended displacement.
    pub disp: i64,
    /// The `67` prefix: the address is 32 bits wide.
    pub addr32: bool,
}

/// A decoded `0f <opcode> /reg` instruction with a memory operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    /// Second opcode byte (after `0f`).
    pub opcode: u8,
    /// ModRM.reg (the opcode extension of a group), without REX.R.
    pub reg: u8,
    /// The memory operand.
    pub mem: MemOperand,
    /// Length of the instruction in bytes.
    pub len: usize,
}

/// Decodes a `0f xx` instruction with a memory operand at the start of `code`.
pub fn decode_0f_mem(code: &[u8]) -> Option<Insn> {
    let mut i = 0;
    let mut segment = None;
    let mut addr32 = false;
    // Legacy prefixes (at most 4 in practice; the instruction is at most 15 bytes).
    while let Some(&b) = code.get(i) {
        match b {
            0x26 | 0x2e | 0x36 | 0x3e => {}
            0x64 => segment = Some(Segment::Fs),
            0x65 => segment = Some(Segment::Gs),
            0x67 => addr32 = true,
            _ => break,
        }
        i += 1;
        if i > 4 {
            return None;
        }
    }
    let mut rex = 0u8;
    if let Some(&b) = code.get(i) {
        if b & 0xf0 == 0x40 {
            rex = b;
            i += 1;
        }
    }
    if *code.get(i)? != 0x0f {
        return None;
    }
    let opcode = *code.get(i + 1)?;
    let modrm = *code.get(i + 2)?;
    i += 3;
    let md = modrm >> 6;
    let reg = (modrm >> 3) & 7;
    let rm = modrm & 7;
    if md == 3 {
        return None;
    }
    let rex_b = (rex & 1) << 3;
    let rex_x = (rex & 2) << 2;
    let mut base = Some(Base::Gpr(rm | rex_b));
    let mut index = None;
    let mut disp_len = match md {
        1 => 1,
        2 => 4,
        _ => 0,
    };
    if rm == 4 {
        let sib = *code.get(i)?;
        i += 1;
        let scale = 1u8 << (sib >> 6);
        let idx = ((sib >> 3) & 7) | rex_x;
        if idx != 4 {
            index = Some((idx, scale));
        }
        let sib_base = sib & 7;
        base = if sib_base == 5 && md == 0 {
            disp_len = 4;
            None
        } else {
            Some(Base::Gpr(sib_base | rex_b))
        };
    } else if rm == 5 && md == 0 {
        base = Some(Base::Rip);
        disp_len = 4;
    }
    let disp = match disp_len {
        1 => i64::from(*code.get(i)? as i8),
        4 => i64::from(i32::from_le_bytes(code.get(i..i + 4)?.try_into().ok()?)),
        _ => 0,
    };
    let len = i + disp_len;
    if len > 15 {
        return None;
    }
    Some(Insn { opcode, reg, mem: MemOperand { segment, base, index, disp, addr32 }, len })
}

/// The value of general-purpose register `n` (0 = rax ... 15 = r15) in `regs`.
pub fn gpr(regs: &kvm_regs, n: u8) -> u64 {
    match n & 15 {
        0 => regs.rax,
        1 => regs.rcx,
        2 => regs.rdx,
        3 => regs.rbx,
        4 => regs.rsp,
        5 => regs.rbp,
        6 => regs.rsi,
        7 => regs.rdi,
        8 => regs.r8,
        9 => regs.r9,
        10 => regs.r10,
        11 => regs.r11,
        12 => regs.r12,
        13 => regs.r13,
        14 => regs.r14,
        _ => regs.r15,
    }
}

impl Insn {
    /// The guest-virtual address of the memory operand, with `regs` the registers
    /// at the instruction (RIP pointing at it) and the `fs`/`gs` bases.
    pub fn effective_address(&self, regs: &kvm_regs, fs_base: u64, gs_base: u64) -> u64 {
        let m = &self.mem;
        let mut addr = m.disp as u64;
        match m.base {
            Some(Base::Gpr(n)) => addr = addr.wrapping_add(gpr(regs, n)),
            Some(Base::Rip) => addr = addr.wrapping_add(regs.rip.wrapping_add(self.len as u64)),
            None => {}
        }
        if let Some((n, scale)) = m.index {
            addr = addr.wrapping_add(gpr(regs, n).wrapping_mul(u64::from(scale)));
        }
        if m.addr32 {
            addr &= 0xffff_ffff;
        }
        match m.segment {
            Some(Segment::Fs) => addr.wrapping_add(fs_base),
            Some(Segment::Gs) => addr.wrapping_add(gs_base),
            None => addr,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs() -> kvm_regs {
        kvm_regs {
            rax: 0x1000,
            rbx: 0x2000,
            rsp: 0xffff_c900_0001_3e80,
            rbp: 0x5000,
            r12: 0x7000,
            r13: 0x10,
            rip: 0xffff_ffff_8104_2000,
            ..Default::default()
        }
    }

    #[test]
    fn stack_operand_with_sib_and_disp8() {
        // stmxcsr 0x4(%rsp): 0f ae 5c 24 04
        let insn = decode_0f_mem(&[0x0f, 0xae, 0x5c, 0x24, 0x04, 0xc3]).unwrap();
        assert_eq!((insn.opcode, insn.reg, insn.len), (0xae, 3, 5));
        assert_eq!(insn.mem.base, Some(Base::Gpr(4)));
        assert_eq!(insn.mem.index, None, "index 100 is none");
        assert_eq!(insn.effective_address(&regs(), 0, 0), 0xffff_c900_0001_3e84);
    }

    #[test]
    fn rip_relative_operand() {
        // ldmxcsr -0x10(%rip): 0f ae 15 f0 ff ff ff; the address is from the next insn.
        let insn = decode_0f_mem(&[0x0f, 0xae, 0x15, 0xf0, 0xff, 0xff, 0xff]).unwrap();
        assert_eq!((insn.reg, insn.len, insn.mem.base), (2, 7, Some(Base::Rip)));
        assert_eq!(insn.effective_address(&regs(), 0, 0), 0xffff_ffff_8104_2007 - 0x10);
    }

    #[test]
    fn rex_gs_and_scaled_index() {
        // gs ldmxcsr 0x80(%r12,%r13,8): 65 43 0f ae 94 ec 80 00 00 00
        let code = [0x65, 0x43, 0x0f, 0xae, 0x94, 0xec, 0x80, 0, 0, 0];
        let insn = decode_0f_mem(&code).unwrap();
        assert_eq!(insn.len, 10);
        assert_eq!(insn.mem.segment, Some(Segment::Gs));
        assert_eq!(insn.mem.base, Some(Base::Gpr(12)));
        assert_eq!(insn.mem.index, Some((13, 8)));
        assert_eq!(insn.effective_address(&regs(), 0, 0x100_0000), 0x100_0000 + 0x7000 + 0x80 + 0x80);
    }

    #[test]
    fn plain_base_disp32_without_base_and_addr32() {
        // stmxcsr (%rax): 0f ae 18
        let insn = decode_0f_mem(&[0x0f, 0xae, 0x18]).unwrap();
        assert_eq!((insn.reg, insn.len), (3, 3));
        assert_eq!(insn.effective_address(&regs(), 0, 0), 0x1000);
        // ldmxcsr 0x1234 (SIB, no base, no index): 0f ae 14 25 34 12 00 00
        let insn = decode_0f_mem(&[0x0f, 0xae, 0x14, 0x25, 0x34, 0x12, 0, 0]).unwrap();
        assert_eq!((insn.mem.base, insn.mem.index, insn.len), (None, None, 8));
        assert_eq!(insn.effective_address(&regs(), 0, 0), 0x1234);
        // rbp with mod 00 in rm is RIP-relative, with mod 01 it is rbp + disp8.
        let insn = decode_0f_mem(&[0x0f, 0xae, 0x55, 0xfc]).unwrap();
        assert_eq!(insn.effective_address(&regs(), 0, 0), 0x5000 - 4);
        // 67: the address wraps at 32 bits; fs adds its base.
        let insn = decode_0f_mem(&[0x64, 0x67, 0x0f, 0xae, 0x5c, 0x24, 0x04]).unwrap();
        assert!(insn.mem.addr32);
        assert_eq!(insn.effective_address(&regs(), 0x10, 0), 0x0001_3e84 + 0x10);
    }

    #[test]
    fn refuses_what_it_does_not_decode() {
        assert_eq!(decode_0f_mem(&[0x0f, 0xae, 0xe8]), None, "register form (lfence)");
        assert_eq!(decode_0f_mem(&[0x66, 0x0f, 0xae, 0x38]), None, "operand-size prefix (clflushopt)");
        assert_eq!(decode_0f_mem(&[0x9b]), None, "not 0f");
        assert_eq!(decode_0f_mem(&[0x0f, 0xae, 0x5c, 0x24]), None, "truncated disp8");
        assert_eq!(decode_0f_mem(&[0x0f, 0xae, 0x15, 0xf0, 0xff]), None, "truncated disp32");
        assert_eq!(decode_0f_mem(&[]), None);
        assert_eq!(decode_0f_mem(&[0x2e; 6]), None, "too many prefixes");
    }
}
