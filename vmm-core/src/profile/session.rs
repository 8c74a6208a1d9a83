//! A profile's output: the whole run in one report, and optionally the
//! run cut into labelled slices.
//!
//! A container's life is a sequence of steps (create, start, exec, ...),
//! and a profile of the whole life mixes them. The control API's
//! `profile_mark` action ends a slice: the samples taken since the previous
//! mark (or the start) are written as a report of their own, named after
//! the label, so the shim can hand over one profile per step. The whole
//! run is still written at the end, and the samples after the last mark
//! become one more slice, `rest`.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use super::{
    report::{self, with_suffix},
    symbols::Symbols,
    Profiler, Sample,
};

/// The longest slice label.
const MAX_LABEL: usize = 48;

/// Errors ending a slice.
#[derive(Debug, thiserror::Error)]
pub enum MarkError {
    /// The label is not a short name of `[A-Za-z0-9_.-]`.
    #[error("profile label {0:?} is not 1-48 characters of A-Z a-z 0-9 _ . -")]
    Label(String),
    /// Writing the slice's report failed.
    #[error("writing the profile slice {0}")]
    Write(PathBuf, #[source] std::io::Error),
}

#[derive(Debug, Default)]
struct Marks {
    counts: HashMap<Sample, u64>,
    dropped: u64,
    slices: u32,
}

/// The profiler of a running VM and where its reports go.
#[derive(Debug)]
pub struct Session {
    profiler: Arc<Profiler>,
    out: PathBuf,
    symbols: Symbols,
    last: Mutex<Marks>,
}

/// `a - b`, per stack (stacks only in `b` cannot happen: counts only grow).
fn since(a: &HashMap<Sample, u64>, b: &HashMap<Sample, u64>) -> HashMap<Sample, u64> {
    a.iter()
        .filter_map(|(s, &n)| {
            let d = n.saturating_sub(b.get(s).copied().unwrap_or(0));
            (d > 0).then(|| (s.clone(), d))
        })
        .collect()
}

impl Session {
    /// Reports of `profiler`'s samples go to `out` (and `out.NN-label`),
    /// named with `symbols`.
    pub fn new(profiler: Arc<Profiler>, out: &Path, symbols: Symbols) -> Self {
        Self {
            profiler,
            out: out.to_path_buf(),
            symbols,
            last: Mutex::default(),
        }
    }

    /// Where the whole run's report goes.
    pub fn out(&self) -> &Path {
        &self.out
    }

    /// Ends a slice: writes the samples since the previous mark to
    /// `out.NN-label` (with `.svg` and `.top`); the file it wrote.
    pub fn mark(&self, label: &str) -> Result<PathBuf, MarkError> {
        let valid = !label.is_empty()
            && label.len() <= MAX_LABEL
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
            && !label.starts_with('.');
        if !valid {
            return Err(MarkError::Label(label.to_string()));
        }
        let (counts, dropped) = self.profiler.snapshot();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let slice = since(&counts, &last.counts);
        let path = with_suffix(&self.out, &format!(".{:02}-{label}", last.slices + 1));
        report::build(&slice, dropped.saturating_sub(last.dropped), &self.symbols)
            .write(&path)
            .map_err(|e| MarkError::Write(path.clone(), e))?;
        *last = Marks {
            counts,
            dropped,
            slices: last.slices + 1,
        };
        Ok(path)
    }

    /// Writes the whole run to `out` and, if slices were marked, what came
    /// after the last one as the slice `rest`. Returns the whole run's
    /// report.
    pub fn finish(&self) -> std::io::Result<report::Report> {
        let (counts, dropped) = self.profiler.snapshot();
        let whole = report::build(&counts, dropped, &self.symbols);
        whole.write(&self.out)?;
        let marked = self.last.lock().unwrap_or_else(|e| e.into_inner()).slices > 0;
        if marked {
            self.mark("rest")
                .map_err(|e| std::io::Error::other(e.to_string()))?;
        }
        Ok(whole)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_hold_the_samples_since_the_last_mark() {
        let dir = std::env::temp_dir().join(format!("husk-slices-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let profiler = Arc::new(Profiler::new(1, 100, true));
        let symbols = Symbols::parse(
            "ffffffff81000000 T _text\nffffffff81000100 T f\nffffffff81000200 T g\nffffffff81001000 T _etext\n",
        );
        let s = Session::new(profiler.clone(), &dir.join("p"), symbols);
        let f = Sample::Kernel(vec![0xffff_ffff_8100_0110]);
        let g = Sample::Kernel(vec![0xffff_ffff_8100_0210]);
        for _ in 0..3 {
            profiler.record(f.clone());
        }
        let first = s.mark("create").expect("mark");
        assert_eq!(first, dir.join("p.01-create"));
        profiler.record(f.clone());
        profiler.record(g.clone());
        profiler.record(g.clone());
        s.mark("start").expect("mark");
        profiler.record(g);
        let whole = s.finish().expect("finish");
        assert_eq!(whole.samples, 7);
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).expect(name);
        assert_eq!(read("p.01-create"), "[kernel];f 3\n");
        assert_eq!(read("p.02-start"), "[kernel];f 1\n[kernel];g 2\n");
        assert_eq!(read("p.03-rest"), "[kernel];g 1\n");
        assert_eq!(read("p"), "[kernel];f 4\n[kernel];g 3\n");
        assert!(dir.join("p.02-start.svg").exists());
        for bad in ["", "../x", "a/b", ".hidden", &"x".repeat(49), "sp ace"] {
            assert!(matches!(s.mark(bad), Err(MarkError::Label(_))), "{bad:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_run_without_marks_is_one_report() {
        let dir = std::env::temp_dir().join(format!("husk-nomark-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let profiler = Arc::new(Profiler::new(1, 100, false));
        profiler.record(Sample::User(0x1000));
        let s = Session::new(profiler, &dir.join("p"), Symbols::parse(""));
        s.finish().expect("finish");
        let names: Vec<String> = std::fs::read_dir(&dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains("rest")), "{names:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
