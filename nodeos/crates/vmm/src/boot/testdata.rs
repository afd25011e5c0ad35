//! Synthetic kernels for the boot tests: a bzImage with a real setup header
//! and an ELF64 with optional PVH note, built byte by byte from the specs
//! (boot.rst for the header offsets, the ELF-64 object file format). Other
//! crates' tests get them with the feature `testing`.

/// A bzImage's setup header fields (offsets from boot.rst) and its
/// protected-mode payload.
#[derive(Debug, Clone)]
pub struct BzImageSpec {
    pub setup_sects: u8,
    pub version: u16,
    pub loadflags: u8,
    pub xloadflags: u16,
    pub cmdline_size: u32,
    pub init_size: u32,
    pub initrd_addr_max: u32,
    pub kernel_alignment: u32,
    pub pref_address: u64,
    pub payload: Vec<u8>,
}

impl Default for BzImageSpec {
    fn default() -> Self {
        // 8 KiB of protected-mode kernel: `hlt` everywhere.
        Self {
            setup_sects: 4,
            version: 0x020f,
            loadflags: 0x01,  // LOADED_HIGH
            xloadflags: 0x03, // XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
            cmdline_size: 2047,
            init_size: 0x40_0000,
            initrd_addr_max: 0x7fff_ffff,
            kernel_alignment: 0x20_0000,
            pref_address: 0x100_0000,
            payload: vec![0xf4; 0x2000],
        }
    }
}

impl BzImageSpec {
    /// Puts `code` at the 64-bit entry (payload offset 0x200).
    pub fn with_startup_64(mut self, code: &[u8]) -> Self {
        self.payload[0x200..0x200 + code.len()].copy_from_slice(code);
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let setup_len = (usize::from(self.setup_sects) + 1) * 512;
        let mut img = vec![0u8; setup_len];
        let put =
            |img: &mut Vec<u8>, off: usize, bytes: &[u8]| img[off..off + bytes.len()].copy_from_slice(bytes);
        put(&mut img, 0x1f1, &[self.setup_sects]); // setup_sects
        put(&mut img, 0x1f4, &((self.payload.len() / 16) as u32).to_le_bytes()); // syssize
        put(&mut img, 0x1fa, &0xffffu16.to_le_bytes()); // vid_mode
        put(&mut img, 0x1fe, &0xaa55u16.to_le_bytes()); // boot_flag
        put(&mut img, 0x200, &[0xeb, 0x66]); // jump (to 0x268, the end of the header)
        put(&mut img, 0x202, b"HdrS"); // header
        put(&mut img, 0x206, &self.version.to_le_bytes()); // version
        put(&mut img, 0x211, &[self.loadflags]); // loadflags
        put(&mut img, 0x214, &0x10_0000u32.to_le_bytes()); // code32_start
        put(&mut img, 0x22c, &self.initrd_addr_max.to_le_bytes()); // initrd_addr_max
        put(&mut img, 0x230, &self.kernel_alignment.to_le_bytes()); // kernel_alignment
        put(&mut img, 0x234, &[1]); // relocatable_kernel
        put(&mut img, 0x235, &[21]); // min_alignment (2 MiB)
        put(&mut img, 0x236, &self.xloadflags.to_le_bytes()); // xloadflags
        put(&mut img, 0x238, &self.cmdline_size.to_le_bytes()); // cmdline_size
        put(&mut img, 0x258, &self.pref_address.to_le_bytes()); // pref_address
        put(&mut img, 0x260, &self.init_size.to_le_bytes()); // init_size
        img.extend_from_slice(&self.payload);
        img
    }
}

/// One PT_LOAD segment: physical (= virtual) address, file bytes, memory size.
#[derive(Debug, Clone)]
pub struct Segment {
    pub paddr: u64,
    pub data: Vec<u8>,
    pub memsz: u64,
}

const EHDR_LEN: usize = 64;
const PHDR_LEN: usize = 56;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// XEN_ELFNOTE_PHYS32_ENTRY.
const XEN_NOTE_PHYS32_ENTRY: u32 = 18;

/// An ELF64 x86-64 executable with `segments` and, if `pvh_entry` is set, a
/// PT_NOTE holding the Xen PVH entry note.
pub fn elf(entry: u64, segments: &[Segment], pvh_entry: Option<u32>) -> Vec<u8> {
    let phnum = segments.len() + usize::from(pvh_entry.is_some());
    let mut note = Vec::new();
    if let Some(pvh) = pvh_entry {
        note.extend_from_slice(&4u32.to_le_bytes()); // namesz
        note.extend_from_slice(&4u32.to_le_bytes()); // descsz
        note.extend_from_slice(&XEN_NOTE_PHYS32_ENTRY.to_le_bytes());
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&pvh.to_le_bytes());
    }
    let mut offset = (EHDR_LEN + phnum * PHDR_LEN + note.len()).next_multiple_of(16);

    let mut out = Vec::new();
    out.extend_from_slice(b"\x7fELF");
    out.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little-endian, version 1, System V ABI
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&2u16.to_le_bytes()); // e_type: ET_EXEC
    out.extend_from_slice(&62u16.to_le_bytes()); // e_machine: x86-64
    out.extend_from_slice(&1u32.to_le_bytes()); // e_version
    out.extend_from_slice(&entry.to_le_bytes()); // e_entry
    out.extend_from_slice(&(EHDR_LEN as u64).to_le_bytes()); // e_phoff
    out.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    out.extend_from_slice(&(EHDR_LEN as u16).to_le_bytes()); // e_ehsize
    out.extend_from_slice(&(PHDR_LEN as u16).to_le_bytes()); // e_phentsize
    out.extend_from_slice(&(phnum as u16).to_le_bytes()); // e_phnum
    out.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
    assert_eq!(out.len(), EHDR_LEN);

    let phdr = |out: &mut Vec<u8>, p_type: u32, off: u64, paddr: u64, filesz: u64, memsz: u64| {
        out.extend_from_slice(&p_type.to_le_bytes());
        out.extend_from_slice(&5u32.to_le_bytes()); // p_flags: R X
        out.extend_from_slice(&off.to_le_bytes());
        out.extend_from_slice(&paddr.to_le_bytes()); // p_vaddr
        out.extend_from_slice(&paddr.to_le_bytes()); // p_paddr
        out.extend_from_slice(&filesz.to_le_bytes());
        out.extend_from_slice(&memsz.to_le_bytes());
        out.extend_from_slice(&16u64.to_le_bytes()); // p_align
    };
    let mut data_offsets = Vec::new();
    for s in segments {
        phdr(&mut out, PT_LOAD, offset as u64, s.paddr, s.data.len() as u64, s.memsz);
        data_offsets.push(offset);
        offset = (offset + s.data.len()).next_multiple_of(16);
    }
    if pvh_entry.is_some() {
        let note_off = (EHDR_LEN + phnum * PHDR_LEN) as u64;
        phdr(&mut out, PT_NOTE, note_off, 0, note.len() as u64, note.len() as u64);
    }
    out.extend_from_slice(&note);
    for (s, off) in segments.iter().zip(data_offsets) {
        out.resize(off, 0);
        out.extend_from_slice(&s.data);
    }
    out
}
