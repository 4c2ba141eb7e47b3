//! WAL file names and positions: segment names (`TTTTTTTTXXXXXXXXYYYYYYYY`), timeline history
//! files, `.partial` and backup history files, LSNs, and the arithmetic between them.

use std::fmt;

/// Default WAL segment size (initdb's default).
pub const DEFAULT_SEGMENT_SIZE: u64 = 16 * 1024 * 1024;

/// A log sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// Parses `16/B374D848`.
    pub fn parse(s: &str) -> Option<Lsn> {
        let (hi, lo) = s.trim().split_once('/')?;
        let hi = u64::from_str_radix(hi, 16).ok()?;
        let lo = u64::from_str_radix(lo, 16).ok()?;
        (hi <= u32::MAX as u64 && lo <= u32::MAX as u64).then_some(Lsn((hi << 32) | lo))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// The lines of a timeline history file (`parentTLI<TAB>switchpoint<TAB>reason`): each
/// earlier timeline and the LSN where it ended.
pub fn parse_history(text: &str) -> Vec<(u32, Lsn)> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let timeline = f.next()?.parse().ok()?;
            Some((timeline, Lsn::parse(f.next()?)?))
        })
        .collect()
}

/// A segment: timeline and segment number (LSN / segment size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Segment {
    pub timeline: u32,
    pub segno: u64,
}

impl Segment {
    fn per_log(seg_size: u64) -> u64 {
        0x1_0000_0000 / seg_size
    }

    /// The file name, e.g. `000000010000000000000003`.
    pub fn name(&self, seg_size: u64) -> String {
        let per = Self::per_log(seg_size);
        format!(
            "{:08X}{:08X}{:08X}",
            self.timeline,
            self.segno / per,
            self.segno % per
        )
    }

    /// The segment holding `lsn` on `timeline`.
    pub fn containing(timeline: u32, lsn: Lsn, seg_size: u64) -> Segment {
        Segment {
            timeline,
            segno: lsn.0 / seg_size,
        }
    }

    pub fn next(&self) -> Segment {
        Segment {
            timeline: self.timeline,
            segno: self.segno + 1,
        }
    }

    /// First LSN of the segment.
    pub fn start_lsn(&self, seg_size: u64) -> Lsn {
        Lsn(self.segno * seg_size)
    }

    /// First LSN after the segment.
    pub fn end_lsn(&self, seg_size: u64) -> Lsn {
        Lsn((self.segno + 1) * seg_size)
    }
}

/// The kinds of files Postgres archives and restores.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum WalFile {
    /// A full segment.
    Segment(Segment),
    /// `TTTTTTTT.history`: the timeline's history, needed to follow timeline switches.
    History { timeline: u32 },
    /// `<segment>.partial`: the last, incomplete segment of the old timeline at a promotion.
    Partial(Segment),
    /// `<segment>.<offset>.backup`: written at the end of a base backup.
    BackupHistory { segment: Segment, offset: u32 },
}

impl WalFile {
    /// Parses a file name as Postgres passes it to archive_command (`%f`). `seg_size` decodes
    /// the segment number.
    pub fn parse(name: &str, seg_size: u64) -> Option<WalFile> {
        // Uppercase hex, byte by byte: a name that passes is ASCII, so the byte offsets sliced
        // below are char boundaries (a 24-byte name of multi-byte characters reaches here from
        // the API).
        let upper_hex = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
        };
        let hex = |s: &str| s.len() == 8 && upper_hex(s);
        let segment = |s: &str| -> Option<Segment> {
            if s.len() != 24 || !upper_hex(s) {
                return None;
            }
            let tli = u32::from_str_radix(&s[..8], 16).ok()?;
            let log = u64::from_str_radix(&s[8..16], 16).ok()?;
            let seg = u64::from_str_radix(&s[16..], 16).ok()?;
            let per = Segment::per_log(seg_size);
            (tli > 0 && seg < per).then_some(Segment {
                timeline: tli,
                segno: log * per + seg,
            })
        };
        if let Some(tli) = name.strip_suffix(".history") {
            return (hex(tli))
                .then(|| u32::from_str_radix(tli, 16).ok())
                .flatten()
                .filter(|t| *t > 0)
                .map(|timeline| WalFile::History { timeline });
        }
        if let Some(seg) = name.strip_suffix(".partial") {
            return segment(seg).map(WalFile::Partial);
        }
        if let Some(rest) = name.strip_suffix(".backup") {
            let (seg, off) = rest.split_once('.')?;
            let offset = hex(off)
                .then(|| u32::from_str_radix(off, 16).ok())
                .flatten()?;
            return segment(seg).map(|segment| WalFile::BackupHistory { segment, offset });
        }
        segment(name).map(WalFile::Segment)
    }

    pub fn segment(&self) -> Option<Segment> {
        match self {
            WalFile::Segment(s) | WalFile::Partial(s) => Some(*s),
            WalFile::BackupHistory { segment, .. } => Some(*segment),
            WalFile::History { .. } => None,
        }
    }
}

/// The long page header at the start of every WAL segment (`XLogLongPageHeaderData`): where
/// the segment starts, and which database system wrote it. Postgres reads a segment whose
/// header names another position or system as the end of WAL, not as an error, so a restore
/// given a swapped or foreign segment would end early and promote; the fetcher checks the
/// header before handing a segment over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub page_addr: Lsn,
    pub system_identifier: u64,
    pub seg_size: u64,
}

impl SegmentHeader {
    /// Bytes to read from the start of a segment for [`SegmentHeader::parse`].
    pub const LEN: usize = 40;

    /// Parses the long header (machine byte order, as Postgres writes it); `None` when `b` does
    /// not start with one.
    pub fn parse(b: &[u8]) -> Option<SegmentHeader> {
        const XLP_LONG_HEADER: u16 = 0x0002;
        let b = b.get(..Self::LEN)?;
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_ne_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if u16_at(2) & XLP_LONG_HEADER == 0 {
            return None;
        }
        let seg_size = u64::from(u32_at(32));
        (seg_size.is_power_of_two() && (1 << 20..=1 << 30).contains(&seg_size)).then(|| {
            SegmentHeader {
                page_addr: Lsn(u64_at(8)),
                system_identifier: u64_at(24),
                seg_size,
            }
        })
    }
}

/// Checks that `first` (the first [`SegmentHeader::LEN`] bytes of a file restored as WAL file
/// `name`) is that segment, of database system `system_identifier` when it is known. Files
/// other than segments and `.partial` files pass. The error says what the file holds instead.
pub fn check_segment(
    name: &str,
    first: &[u8],
    system_identifier: Option<u64>,
) -> Result<(), String> {
    let Some(WalFile::Segment(_) | WalFile::Partial(_)) =
        WalFile::parse(name, DEFAULT_SEGMENT_SIZE)
    else {
        return Ok(());
    };
    let header = SegmentHeader::parse(first).ok_or_else(|| {
        format!("the content restored as {name} does not start with a WAL segment header")
    })?;
    let seg = match WalFile::parse(name, header.seg_size).and_then(|f| f.segment()) {
        Some(seg) => seg,
        None => {
            return Err(format!(
                "{name} is not a segment name for {} byte segments",
                header.seg_size
            ));
        }
    };
    let expected = seg.start_lsn(header.seg_size);
    if header.page_addr != expected {
        return Err(format!(
            "the content restored as {name} is the WAL segment starting at {}, not at {expected}: the object was swapped with another one",
            header.page_addr
        ));
    }
    if let Some(sysid) = system_identifier
        && header.system_identifier != sysid
    {
        return Err(format!(
            "the content restored as {name} was written by database system {}, and this one is {sysid}: the object belongs to another cluster",
            header.system_identifier
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SZ: u64 = DEFAULT_SEGMENT_SIZE;

    #[test]
    fn lsn_round_trips() {
        let l = Lsn::parse("16/B374D848").unwrap();
        assert_eq!(l.0, 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert_eq!(Lsn::parse("0/0"), Some(Lsn(0)));
        assert_eq!(Lsn::parse("nope"), None);
    }

    #[test]
    fn non_ascii_names_are_not_wal_files() {
        // 24 bytes, with a multi-byte character across byte 8 (found by the API fuzzer: it
        // used to panic slicing inside the character).
        let seg = format!("0000000\u{80}{}", "0".repeat(15));
        assert_eq!(seg.len(), 24);
        let wide = format!("0000\u{10000}\u{102b7}{}", "0".repeat(12));
        assert_eq!(wide.len(), 24);
        for name in [
            seg.clone(),
            wide,
            format!("{seg}.partial"),
            format!("{seg}.00000028.backup"),
            "0000000\u{80}.history".to_string(),
        ] {
            let name = name.as_str();
            assert_eq!(WalFile::parse(name, SZ), None, "{name:?}");
        }
    }

    #[test]
    fn segment_names_match_postgres() {
        // pg_walfile_name('16/B374D848') on timeline 1 = 0000000100000016000000B3
        let s = Segment::containing(1, Lsn::parse("16/B374D848").unwrap(), SZ);
        assert_eq!(s.name(SZ), "0000000100000016000000B3");
        assert_eq!(
            WalFile::parse("0000000100000016000000B3", SZ),
            Some(WalFile::Segment(s))
        );
        // Rolling over the log id: ...000000FF is followed by ...0000000100000000.
        let last = WalFile::parse("0000000200000000000000FF", SZ)
            .unwrap()
            .segment()
            .unwrap();
        assert_eq!(last.next().name(SZ), "000000020000000100000000");
        // 64 MiB segments: 64 per log id.
        let big = 64 * 1024 * 1024;
        assert_eq!(
            Segment {
                timeline: 1,
                segno: 64
            }
            .name(big),
            "000000010000000100000000"
        );
        assert_eq!(WalFile::parse("000000010000000000000040", big), None);
    }

    #[test]
    fn other_file_kinds_parse() {
        assert_eq!(
            WalFile::parse("00000002.history", SZ),
            Some(WalFile::History { timeline: 2 })
        );
        assert!(matches!(
            WalFile::parse("000000010000000000000003.partial", SZ),
            Some(WalFile::Partial(_))
        ));
        assert!(matches!(
            WalFile::parse("000000010000000000000002.00000028.backup", SZ),
            Some(WalFile::BackupHistory { offset: 0x28, .. })
        ));
        for bad in [
            "",
            "../etc/passwd",
            "00000001000000000000000g",
            "0000000100000000000000030",
            "00000000.history",
            "x.history",
        ] {
            assert_eq!(WalFile::parse(bad, SZ), None, "{bad}");
        }
    }

    fn header(page_addr: u64, sysid: u64) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[2..4].copy_from_slice(&0x0002u16.to_ne_bytes());
        b[8..16].copy_from_slice(&page_addr.to_ne_bytes());
        b[24..32].copy_from_slice(&sysid.to_ne_bytes());
        b[32..36].copy_from_slice(&(SZ as u32).to_ne_bytes());
        b
    }

    #[test]
    fn a_restored_segment_must_be_the_one_asked_for() {
        let name = "000000010000000000000003";
        assert_eq!(check_segment(name, &header(3 * SZ, 7), Some(7)), Ok(()));
        assert_eq!(check_segment(name, &header(3 * SZ, 7), None), Ok(()));
        let swapped = check_segment(name, &header(4 * SZ, 7), Some(7)).unwrap_err();
        assert!(
            swapped.contains("0/4000000") && swapped.contains("swapped"),
            "{swapped}"
        );
        let foreign = check_segment(name, &header(3 * SZ, 8), Some(7)).unwrap_err();
        assert!(foreign.contains("another cluster"), "{foreign}");
        let junk = check_segment(name, &[0u8; 64], Some(7)).unwrap_err();
        assert!(junk.contains("header"), "{junk}");
        assert!(
            check_segment("000000010000000000000003.partial", &header(4 * SZ, 7), None).is_err()
        );
        // History and backup history files are not segments.
        assert_eq!(
            check_segment("00000002.history", b"1\t0/3000000\tx\n", Some(7)),
            Ok(())
        );
        assert_eq!(
            check_segment("000000010000000000000003.00000028.backup", b"START", None),
            Ok(())
        );
    }
}
