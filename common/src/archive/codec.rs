//! Compression codecs of the archive format. Every chunk is compressed on its own (an independent
//! zstd frame, lz4 frame or gzip member), so chunks can be compressed and decompressed in
//! parallel and a reader never needs more than one chunk of context.

use std::cell::RefCell;
use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use bytes::Bytes;

use serde::{Deserialize, Serialize};

/// The compression algorithm chosen in configuration (`compression = "zstd"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// No compression.
    None,
    /// Zstandard; the level is configured separately (`zstd_level`).
    #[default]
    Zstd,
    /// LZ4 frame format (lz4_flex).
    Lz4,
    /// gzip (deflate).
    Gzip,
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
            Compression::Lz4 => "lz4",
            Compression::Gzip => "gzip",
        })
    }
}

impl FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Compression::None),
            "zstd" => Ok(Compression::Zstd),
            "lz4" => Ok(Compression::Lz4),
            "gzip" => Ok(Compression::Gzip),
            other => Err(format!(
                "unknown compression {other:?}: expected zstd, lz4, gzip or none"
            )),
        }
    }
}

/// Default zstd level: zstd's own default.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;
/// Default gzip level: gzip's own default.
pub const DEFAULT_GZIP_LEVEL: u32 = 6;

/// A codec with its parameters, as used to write an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    None,
    /// zstd at this level (negative levels are zstd's fast levels; 1..=22 otherwise).
    Zstd {
        level: i32,
    },
    Lz4,
    Gzip {
        level: u32,
    },
}

impl Codec {
    /// The codec for a configured compression with the default level.
    pub fn from_compression(compression: Compression, zstd_level: Option<i32>) -> Codec {
        match compression {
            Compression::None => Codec::None,
            Compression::Zstd => Codec::Zstd {
                level: zstd_level.unwrap_or(DEFAULT_ZSTD_LEVEL),
            },
            Compression::Lz4 => Codec::Lz4,
            Compression::Gzip => Codec::Gzip {
                level: DEFAULT_GZIP_LEVEL,
            },
        }
    }

    /// The algorithm, without parameters.
    pub fn compression(&self) -> Compression {
        match self {
            Codec::None => Compression::None,
            Codec::Zstd { .. } => Compression::Zstd,
            Codec::Lz4 => Compression::Lz4,
            Codec::Gzip { .. } => Compression::Gzip,
        }
    }

    /// The codec byte stored in the header.
    pub fn id(&self) -> u8 {
        compression_id(self.compression())
    }

    /// Compresses one chunk into a new buffer.
    pub fn compress(&self, plain: &[u8]) -> io::Result<Vec<u8>> {
        match *self {
            Codec::None => {
                // Room for the chunk digest and the tag or CRC appended next, so sealing does not
                // reallocate.
                let mut out = Vec::with_capacity(plain.len() + 48);
                out.extend_from_slice(plain);
                Ok(out)
            }
            Codec::Zstd { level } => ZSTD_COMPRESSOR.with(|cell| {
                let mut slot = cell.borrow_mut();
                // A compression context is expensive to build (allocations sized by the level), so
                // each worker thread keeps one per level instead of one per chunk.
                if slot.as_ref().is_none_or(|(l, _)| *l != level) {
                    let mut c = zstd::bulk::Compressor::new(level)?;
                    // The frame's content checksum (XXH64) is what a reader of an encrypted
                    // object checks instead of re-hashing the chunk (format version 2).
                    c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))?;
                    *slot = Some((level, c));
                }
                let (_, compressor) = slot.as_mut().expect("just set");
                let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(plain.len()));
                compressor.compress_to_buffer(plain, &mut out)?;
                Ok(out)
            }),
            Codec::Lz4 => {
                let mut encoder = lz4_flex::frame::FrameEncoder::with_frame_info(
                    lz4_flex::frame::FrameInfo::new().content_checksum(true),
                    Vec::with_capacity(plain.len() / 2 + 64),
                );
                encoder.write_all(plain)?;
                encoder.finish().map_err(io::Error::other)
            }
            Codec::Gzip { level } => {
                let mut encoder = flate2::write::GzEncoder::new(
                    Vec::with_capacity(plain.len() / 2 + 64),
                    flate2::Compression::new(level),
                );
                encoder.write_all(plain)?;
                encoder.finish()
            }
        }
    }
}

thread_local! {
    static ZSTD_COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
    static ZSTD_DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

pub(crate) fn compression_id(c: Compression) -> u8 {
    match c {
        Compression::None => 0,
        Compression::Zstd => 1,
        Compression::Lz4 => 2,
        Compression::Gzip => 3,
    }
}

pub(crate) fn compression_from_id(id: u8) -> Option<Compression> {
    match id {
        0 => Some(Compression::None),
        1 => Some(Compression::Zstd),
        2 => Some(Compression::Lz4),
        3 => Some(Compression::Gzip),
        _ => None,
    }
}

/// Whether a compressed chunk carries its codec's checksum of the content: the zstd frame's
/// content checksum flag, the LZ4 frame's content checksum flag; gzip always ends with the CRC-32
/// of its content; uncompressed data has none to carry. Only the frame header is looked at: the
/// decompressor checks the checksum itself.
pub(crate) fn has_content_checksum(compression: Compression, data: &[u8]) -> bool {
    const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];
    const LZ4_MAGIC: [u8; 4] = [0x04, 0x22, 0x4D, 0x18];
    match compression {
        Compression::None | Compression::Gzip => true,
        // Frame header descriptor, bit 2: Content_Checksum_flag.
        Compression::Zstd => data.len() > 4 && data[..4] == ZSTD_MAGIC && data[4] & 0x04 != 0,
        // FLG byte, bit 2: content checksum.
        Compression::Lz4 => data.len() > 4 && data[..4] == LZ4_MAGIC && data[4] & 0x04 != 0,
    }
}

/// Alignment of decompressed zstd chunks in memory, so that a chunk can be written to a file
/// opened with `O_DIRECT` without a copy. 4096 satisfies every common logical block size.
pub const DIRECT_IO_ALIGN: usize = 4096;

/// Decompresses one chunk, refusing output larger than `max_len` (so a crafted chunk cannot
/// make the reader allocate without bound). Zstd output starts at a [`DIRECT_IO_ALIGN`]-aligned
/// address.
pub(crate) fn decompress(
    compression: Compression,
    data: Vec<u8>,
    max_len: usize,
) -> io::Result<Bytes> {
    let out = match compression {
        // Stored as is: hand the buffer back rather than copying it.
        Compression::None => {
            if data.len() > max_len {
                return Err(io::Error::other(format!(
                    "chunk of {} bytes exceeds {max_len}",
                    data.len()
                )));
            }
            Bytes::from(data)
        }
        Compression::Zstd => ZSTD_DECOMPRESSOR.with(|cell| -> io::Result<Bytes> {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(zstd::bulk::Decompressor::new()?);
            }
            let decompressor = slot.as_mut().expect("just set");
            // Decompress behind an aligned start; the few bytes before it are never used.
            let buf: Vec<u8> = Vec::with_capacity(max_len + DIRECT_IO_ALIGN);
            let start = buf.as_ptr().align_offset(DIRECT_IO_ALIGN);
            let mut cursor = io::Cursor::new(buf);
            cursor.set_position(start as u64);
            decompressor.decompress_to_buffer(&data, &mut cursor)?;
            Ok(Bytes::from(cursor.into_inner()).slice(start..))
        })?,
        Compression::Lz4 => Bytes::from(read_bounded(
            lz4_flex::frame::FrameDecoder::new(data.as_slice()),
            max_len,
        )?),
        Compression::Gzip => Bytes::from(read_bounded(
            flate2::read::GzDecoder::new(data.as_slice()),
            max_len,
        )?),
    };
    if out.len() > max_len {
        return Err(io::Error::other(format!(
            "chunk decompresses to more than {max_len} bytes"
        )));
    }
    Ok(out)
}

fn read_bounded(reader: impl Read, max_len: usize) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(max_len.min(1 << 20));
    // One byte over the bound is enough for the caller to refuse the chunk.
    reader.take(max_len as u64 + 1).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_codec_round_trips_and_bounds_output() {
        let data: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        for codec in [
            Codec::None,
            Codec::Zstd { level: 1 },
            Codec::Zstd { level: 19 },
            Codec::Lz4,
            Codec::Gzip { level: 6 },
        ] {
            let packed = codec.compress(&data).unwrap();
            let back = decompress(codec.compression(), packed.clone(), data.len()).unwrap();
            assert_eq!(back, data, "{codec:?}");
            assert!(
                decompress(codec.compression(), packed.clone(), data.len() - 1).is_err(),
                "{codec:?} bound"
            );
        }
    }

    #[test]
    fn zstd_output_starts_aligned_for_direct_io() {
        let data = vec![7u8; 3 * DIRECT_IO_ALIGN + 5];
        let packed = Codec::Zstd { level: 1 }.compress(&data).unwrap();
        for _ in 0..8 {
            let back = decompress(Compression::Zstd, packed.clone(), 1 << 20).unwrap();
            assert_eq!(back, data);
            assert_eq!(back.as_ptr().align_offset(DIRECT_IO_ALIGN), 0);
        }
    }

    #[test]
    fn compression_names_parse() {
        for c in [
            Compression::None,
            Compression::Zstd,
            Compression::Lz4,
            Compression::Gzip,
        ] {
            assert_eq!(c.to_string().parse::<Compression>().unwrap(), c);
            assert_eq!(compression_from_id(compression_id(c)), Some(c));
        }
        assert!("brotli".parse::<Compression>().is_err());
    }
}
