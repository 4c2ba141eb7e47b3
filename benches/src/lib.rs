//! pgpilot benchmarks. The code is in `benches/` (criterion targets) and the scripts beside
//! this crate; see docs/benchmarks.md. This library is empty: a package needs one target.
#![forbid(unsafe_code)]
