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
        let hex = |s: &str| {
            s.len() == 8
                && s.chars()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_lowercase())
        };
        let segment = |s: &str| -> Option<Segment> {
            if s.len() != 24 || !hex(&s[..8]) || !hex(&s[8..16]) || !hex(&s[16..]) {
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
}
