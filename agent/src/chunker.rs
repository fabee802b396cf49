//! Content-defined chunking: FastCDC (2020) with a gear table seeded from the
//! master key, so chunk boundaries depend on a secret (FORMAT.md, "Chunking"
//! and "Threat model" for what that does and does not protect).

use std::io::Read;

use fastcdc::v2020::{Normalization, StreamCDC};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Chunk size parameters, fixed at `init` and stored in the repository config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkerParams {
    /// Smallest chunk (bytes). A record smaller than this is one blob.
    pub min_size: u32,
    /// Average chunk (bytes).
    pub avg_size: u32,
    /// Largest chunk (bytes).
    pub max_size: u32,
}

impl Default for ChunkerParams {
    /// 64 KiB / 256 KiB / 4 MiB: a 2 KB chat message or a 40 KB email is one
    /// blob (no per-chunk overhead on the common small record), while a 20 MB
    /// attachment becomes ~80 chunks, so an attachment re-sent inside another
    /// message, or an edited document, deduplicates at ~256 KiB granularity.
    fn default() -> Self {
        ChunkerParams {
            min_size: 64 * 1024,
            avg_size: 256 * 1024,
            max_size: 4 * 1024 * 1024,
        }
    }
}

impl ChunkerParams {
    /// Check the parameters against FastCDC's limits.
    pub fn validate(&self) -> Result<()> {
        use fastcdc::v2020::{
            AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN,
        };
        let (min, avg, max) = (
            self.min_size as usize,
            self.avg_size as usize,
            self.max_size as usize,
        );
        let ok = (MINIMUM_MIN..=MINIMUM_MAX).contains(&min)
            && (AVERAGE_MIN..=AVERAGE_MAX).contains(&avg)
            && (MAXIMUM_MIN..=MAXIMUM_MAX).contains(&max)
            && min < avg
            && avg < max
            && min % 2 == 0
            && avg % 2 == 0
            && max % 2 == 0;
        if ok {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "chunker sizes min {min} / avg {avg} / max {max} are outside FastCDC's limits \
                 (min {MINIMUM_MIN}..={MINIMUM_MAX}, avg {AVERAGE_MIN}..={AVERAGE_MAX}, \
                 max {MAXIMUM_MIN}..={MAXIMUM_MAX}, min < avg < max, all even)"
            )))
        }
    }

    /// A streaming chunker over `source`.
    pub fn stream<R: Read>(&self, source: R, seed: u64) -> StreamCDC<R> {
        StreamCDC::with_level_and_seed(
            source,
            self.min_size as usize,
            self.avg_size as usize,
            self.max_size as usize,
            Normalization::Level1,
            seed,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_depend_on_the_seed_and_cover_the_input() {
        let p = ChunkerParams {
            min_size: 1024,
            avg_size: 4096,
            max_size: 16384,
        };
        p.validate().unwrap();
        let data: Vec<u8> = (0..400_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let cuts = |seed| -> Vec<u64> {
            p.stream(&data[..], seed)
                .map(|c| c.unwrap().offset)
                .collect()
        };
        let (a, b) = (cuts(1), cuts(2));
        assert_ne!(a, b);
        let total: usize = p.stream(&data[..], 1).map(|c| c.unwrap().length).sum();
        assert_eq!(total, data.len());
        assert!(ChunkerParams {
            min_size: 8,
            avg_size: 4096,
            max_size: 16384
        }
        .validate()
        .is_err());
    }
}
