//! A sealed scratch file for cold record partitions during a record backup.
//!
//! A record backup holds each collection's working state — every record node
//! of every partition it touched — until the snapshot is written. At ~1.7 KB
//! per small record that is 1.7 GB for a million messages. Partitions go
//! cold: mail and chat arrive roughly in time order and partitions are
//! months, so a partition that has not been touched for a while is parked
//! here and read back only if a later change lands in it (or when the
//! snapshot is written).
//!
//! The file is anonymous (`O_TMPFILE` where the system has it, else created
//! and unlinked at once in the temporary directory): nothing is left behind
//! when the process dies, whatever way. Each region is zstd-compressed and
//! sealed with XChaCha20-Poly1305 under a random key that lives only in this
//! process, with its offset as associated data, so record metadata never
//! reaches the disk in the clear and a region cannot be swapped for another.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use rand::RngCore;

use crate::crypto::Cipher;

/// zstd level of parked regions: fast; the win is in leaving memory.
const LEVEL: i32 = 1;

/// Where a parked region is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    offset: u64,
    len: u64,
}

/// The scratch file (created on first use) and its key.
pub struct Spill {
    file: Option<File>,
    cipher: Cipher,
    /// Bytes written so far: regions are only ever appended.
    end: u64,
}

impl std::fmt::Debug for Spill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spill")
            .field("end", &self.end)
            .finish_non_exhaustive()
    }
}

impl Default for Spill {
    fn default() -> Self {
        Self::new()
    }
}

impl Spill {
    /// A spill with a fresh random key; no file until the first [`Spill::put`].
    pub fn new() -> Spill {
        let mut key = zeroize::Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(key.as_mut());
        Spill {
            file: None,
            cipher: Cipher::new(&key),
            end: 0,
        }
    }

    /// Park `plain`; errors name the temporary directory.
    pub fn put(&mut self, plain: &[u8]) -> io::Result<Region> {
        let packed = zstd::bulk::compress(plain, LEVEL)?;
        let offset = self.end;
        let sealed = self.cipher.seal(&offset.to_le_bytes(), &packed);
        if self.file.is_none() {
            let dir = std::env::temp_dir();
            let f = tempfile::tempfile_in(&dir)
                .map_err(|e| named(&dir, "create a spill file in", e))?;
            self.file = Some(f);
        }
        let file = self.file.as_ref().expect("just created");
        file.write_all_at(&sealed, offset)
            .map_err(|e| named(&std::env::temp_dir(), "write the spill file in", e))?;
        let len = sealed.len() as u64;
        self.end += len;
        Ok(Region { offset, len })
    }

    /// Read a parked region back.
    pub fn get(&self, r: Region) -> io::Result<Vec<u8>> {
        let file = self
            .file
            .as_ref()
            .ok_or_else(|| io::Error::other("spill region read before any was written"))?;
        let len = usize::try_from(r.len).map_err(io::Error::other)?;
        let mut sealed = vec![0u8; len];
        file.read_exact_at(&mut sealed, r.offset)
            .map_err(|e| named(&std::env::temp_dir(), "read the spill file in", e))?;
        let packed = self
            .cipher
            .open(&r.offset.to_le_bytes(), &sealed)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "spill region does not authenticate",
                )
            })?;
        zstd::stream::decode_all(&packed[..])
    }
}

fn named(dir: &std::path::Path, what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", dir.display()))
}

/// Length-prefixed fields (u32 LE each), the partition's on-spill encoding.
pub fn push_field(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&(field.len() as u32).to_le_bytes());
    out.extend_from_slice(field);
}

/// The fields [`push_field`] wrote, in order; None when cut short.
pub fn fields(mut buf: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let (len, rest) = buf.split_first_chunk::<4>()?;
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return None;
        }
        let (field, rest) = rest.split_at(len);
        out.push(field);
        buf = rest;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_round_trip_and_are_neither_plain_nor_swappable() {
        let mut s = Spill::new();
        let a: Vec<u8> = b"{\"customer\":\"ana@example.org\"}".repeat(200);
        let b: Vec<u8> = (0..50_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let (ra, rb) = (s.put(&a).unwrap(), s.put(&b).unwrap());
        assert_eq!(s.get(rb).unwrap(), b);
        assert_eq!(s.get(ra).unwrap(), a);
        assert_eq!(s.end, ra.len + rb.len);

        let mut disk = vec![0u8; s.end as usize];
        s.file
            .as_ref()
            .unwrap()
            .read_exact_at(&mut disk, 0)
            .unwrap();
        assert!(
            !disk.windows(13).any(|w| w == b"ana@example.o"),
            "plaintext on disk"
        );
        // A region read at another offset (a swapped region) does not open.
        let moved = Region {
            offset: rb.offset,
            len: ra.len,
        };
        assert!(s.get(moved).is_err());
        // Nor does a damaged one.
        s.file
            .as_ref()
            .unwrap()
            .write_all_at(&[disk[10] ^ 1], 10)
            .unwrap();
        assert_eq!(s.get(ra).unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn fields_round_trip_and_refuse_a_cut() {
        let mut buf = Vec::new();
        for f in [&b"id-1"[..], b"", b"{\"a\":1}"] {
            push_field(&mut buf, f);
        }
        assert_eq!(fields(&buf).unwrap(), vec![&b"id-1"[..], b"", b"{\"a\":1}"]);
        assert!(fields(&buf[..buf.len() - 1]).is_none());
        assert!(fields(&buf[..2]).is_none());
        assert_eq!(fields(&[]).unwrap().len(), 0);
    }
}
