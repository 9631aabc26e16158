//! The scheduling core is pure, as a fact the build checks: no file under
//! `src/core` names tokio, tonic, prost, NVML, serde or any other crate the
//! core does not use, nor a module of this crate outside the core
//! (`crate::pb`, `crate::broker`, `super::super::grpc`, …), in a `use` or
//! inline in a path; and outside its tests nothing awaits, sleeps or reads
//! the clock (`now` is always an argument). Comments, strings and
//! character literals are not code, so they may say anything.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Crates the core must never name, each for a reason ARCHITECTURE.md
/// gives: the core is synchronous and sans-IO, protobuf and serialization
/// stop at the edges, and readings of the GPU come in as plain data.
const FORBIDDEN: &[&str] = &[
    "tokio",
    "tokio_stream",
    "tonic",
    "prost",
    "prost_types",
    "nvml",
    "nvml_wrapper",
    "serde",
    "serde_json",
    "hyper",
    "tower",
    "futures",
    "tracing",
];

/// What the core may name at the root of a path besides its own modules:
/// the standard library, primitive types, and the three crates it uses
/// (`thiserror` for its error types, `humantime` to print durations in
/// messages, `proptest` in its tests).
const ALLOWED_ROOTS: &[&str] = &[
    "std",
    "core",
    "alloc",
    "self",
    "thiserror",
    "humantime",
    "proptest",
    "bool",
    "char",
    "str",
    "f32",
    "f64",
    "i8",
    "i16",
    "i32",
    "i64",
    "i128",
    "isize",
    "u8",
    "u16",
    "u32",
    "u64",
    "u128",
    "usize",
];

#[test]
fn the_core_names_nothing_outside_itself_and_never_reads_the_clock() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/core");
    let files = rust_files(&root);
    assert!(
        files.iter().any(|f| f.ends_with("mod.rs")),
        "no src/core/mod.rs under {}",
        root.display()
    );
    let (modules, tests) = core_modules(&root, &files);
    let mut offences = Vec::new();
    for file in &files {
        let source = std::fs::read_to_string(file).unwrap();
        let relative = file.strip_prefix(&root).unwrap();
        let stem = file.file_stem().unwrap().to_string_lossy();
        let place = Place {
            depth: file_depth(relative),
            test: tests.contains(stem.as_ref()),
            modules: modules.clone(),
        };
        for offence in offences_in(&source, &place) {
            offences.push(format!("src/core/{}:{offence}", relative.display()));
        }
    }
    assert!(
        offences.is_empty(),
        "the core must stay free of I/O, RPC, serialization, NVML and the \
         clock, and of the crate's other modules:\n{}",
        offences.join("\n")
    );
}

#[test]
fn an_import_of_a_forbidden_crate_is_caught() {
    let found = offences_in("use tokio::sync::Mutex;\n", &place(1, &["queue"]));
    assert_eq!(found, ["1: names `tokio`"]);
    let found = offences_in("use {std::fmt, tonic::Status};", &place(1, &[]));
    assert_eq!(found, ["1: names `tonic`"]);
    let found = offences_in("extern crate prost;", &place(1, &[]));
    assert_eq!(found, ["1: names `prost`"]);
    let found = offences_in("#[derive(serde::Serialize)]\nstruct A;", &place(1, &[]));
    assert_eq!(found, ["1: names `serde`"]);
}

#[test]
fn a_forbidden_path_inline_is_caught() {
    let source = "fn now() -> u64 {\n    let t = tokio::time::Instant::now();\n    0\n}\n";
    assert_eq!(
        offences_in(source, &place(1, &[])),
        ["2: names `tokio`", "2: reads the clock (`Instant::now`)"]
    );
    let source = "fn f() { ::nvml_wrapper::Nvml::init(); }";
    assert_eq!(
        offences_in(source, &place(1, &[])),
        ["1: names `nvml_wrapper`"]
    );
    let source = "fn f() -> smallvec::SmallVec<[u8; 4]> { Default::default() }";
    assert_eq!(
        offences_in(source, &place(1, &[])),
        ["1: `smallvec::` is neither the core's nor an allowed crate"]
    );
}

#[test]
fn the_crates_other_modules_are_caught() {
    let cases = [
        (
            "use crate::pb::v1::Status;",
            1,
            "1: `crate::pb` is outside the core",
        ),
        (
            "let b = crate::broker::Broker::new();",
            1,
            "1: `crate::broker` is outside the core",
        ),
        (
            "use crate::{core::Request, grpc};",
            1,
            "1: `crate::{` may reach outside the core",
        ),
        (
            "use super::super::config::Config;",
            1,
            "1: `super::super::` leaves the core",
        ),
        ("use super::broker;", 0, "1: `super::` leaves the core"),
        (
            "use grpc::Session;",
            1,
            "1: `grpc::` is neither the core's nor an allowed crate",
        ),
    ];
    for (source, depth, offence) in cases {
        assert_eq!(
            offences_in(source, &place(depth, &["queue"])),
            [offence],
            "{source}"
        );
    }
}

#[test]
fn the_cores_own_paths_comments_and_strings_are_not_offences() {
    let source = r###"
        //! Knows nothing of tokio, tonic, prost or NVML (`crate::broker` does).
        use std::collections::btree_map;
        use std::time::{Duration, Instant};

        use super::queue::Queue;
        use crate::core::Request;

        /* A block comment naming tokio::spawn, /* nested serde */ too. */
        fn f(e: btree_map::Entry<'_, u8, u8>) -> u64 {
            let n: u64 = [1u64].iter().sum::<u64>() + u64::MAX.min(2);
            let s = "tokio::spawn and crate::pb";
            let r = r#"serde "quoted" crate::grpc"#;
            let c = '"';
            let q = '\'';
            humantime::format_duration(Duration::ZERO);
            n
        }

        mod tests {
            use super::super::Scheduler;
            use proptest::prelude::*;
        }
    "###;
    assert_eq!(
        offences_in(source, &place(1, &["queue"])),
        Vec::<String>::new()
    );
}

#[test]
fn the_clock_and_await_are_caught_outside_tests_only() {
    let source = "fn f() -> Instant {\n    Instant::now()\n}\nasync fn g() {}\n";
    assert_eq!(
        offences_in(source, &place(1, &[])),
        ["2: reads the clock (`Instant::now`)", "4: awaits (`async`)"]
    );
    let source = "fn f() { std::thread::sleep(Duration::ZERO) }";
    assert_eq!(offences_in(source, &place(1, &[])), ["1: sleeps"]);
    let source = "#[cfg(test)]\nmod tests {\n    fn t() { let _ = Instant::now(); }\n}\nfn f() { SystemTime::now(); }";
    assert_eq!(
        offences_in(source, &place(1, &[])),
        ["5: reads the clock (`SystemTime::now`)"]
    );
    let test_file = Place {
        test: true,
        ..place(1, &[])
    };
    assert_eq!(
        offences_in("fn t() { Instant::now(); }", &test_file),
        Vec::<String>::new()
    );
}

/// Where a file stands in the core.
struct Place {
    /// How many modules below the core its top level is.
    depth: usize,
    /// Whether it is a test module (`#[cfg(test)] mod NAME;`).
    test: bool,
    /// The core's own module names.
    modules: BTreeSet<String>,
}

fn place(depth: usize, modules: &[&str]) -> Place {
    Place {
        depth,
        test: false,
        modules: modules.iter().map(|n| (*n).to_owned()).collect(),
    }
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// How many modules below the core a file's top level is: 0 for
/// `mod.rs`, 1 for `gpu.rs` or `gpu/mod.rs`, 2 for `gpu/admission.rs`.
fn file_depth(relative: &Path) -> usize {
    let components = relative.components().count();
    if relative.ends_with("mod.rs") {
        components - 1
    } else {
        components
    }
}

/// The core's own module names (its files and folders, and every `mod
/// NAME` in them), and those of its test modules (`#[cfg(test)] mod NAME;`).
fn core_modules(root: &Path, files: &[PathBuf]) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut names, mut tests) = (BTreeSet::new(), BTreeSet::new());
    for file in files {
        for part in file.strip_prefix(root).unwrap().components() {
            let part = part.as_os_str().to_string_lossy();
            names.insert(part.trim_end_matches(".rs").to_owned());
        }
        let code = strip(&std::fs::read_to_string(file).unwrap());
        let tokens = tokens(&code);
        for (i, pair) in tokens.windows(2).enumerate() {
            if let [(_, Token::Ident("mod")), (_, Token::Ident(name))] = pair {
                names.insert((*name).to_owned());
                if ends_cfg_test(&tokens[..i]) {
                    tests.insert((*name).to_owned());
                }
            }
        }
    }
    (names, tests)
}

/// Whether `tokens` end with `#[cfg(test)]`.
fn ends_cfg_test(tokens: &[(usize, Token<'_>)]) -> bool {
    const CFG_TEST: [Token<'static>; 7] = [
        Token::Punct('#'),
        Token::Punct('['),
        Token::Ident("cfg"),
        Token::Punct('('),
        Token::Ident("test"),
        Token::Punct(')'),
        Token::Punct(']'),
    ];
    tokens.len() >= CFG_TEST.len()
        && tokens[tokens.len() - CFG_TEST.len()..]
            .iter()
            .map(|t| t.1)
            .eq(CFG_TEST)
}

/// What in `source`, a file at `place`, names something outside the core,
/// or (outside tests) awaits, sleeps or reads the clock, as `LINE: what`.
fn offences_in(source: &str, place: &Place) -> Vec<String> {
    let (depth, test, modules) = (place.depth, place.test, &place.modules);
    let code = strip(source);
    let tokens = tokens(&code);
    let line = |at: usize| code[..at].matches('\n').count() + 1;
    let imported = imported_names(&tokens);
    let mut offences = Vec::new();
    // The open braces: whether each is an inline `mod NAME {`, and whether
    // it opens an item under `#[cfg(test)]`.
    let mut braces: Vec<(bool, bool)> = Vec::new();
    let mut cfg_test = false;
    for (i, &(at, token)) in tokens.iter().enumerate() {
        let before = i.checked_sub(1).map(|j| tokens[j].1);
        let after = |n: usize| tokens.get(i + n).map(|t| t.1);
        let in_test = test || braces.iter().any(|b| b.1);
        cfg_test |= ends_cfg_test(&tokens[..i]);
        match token {
            Token::Punct('{') => {
                let is_mod = i >= 2
                    && tokens[i - 2].1 == Token::Ident("mod")
                    && matches!(tokens[i - 1].1, Token::Ident(_));
                braces.push((is_mod, std::mem::take(&mut cfg_test)));
            }
            Token::Punct('}') => {
                braces.pop();
            }
            Token::Punct(';') => cfg_test = false,
            Token::Ident(name) if FORBIDDEN.contains(&name) => {
                offences.push(format!("{}: names `{name}`", line(at)));
            }
            Token::Ident(word @ ("async" | "await")) if !in_test => {
                offences.push(format!("{}: awaits (`{word}`)", line(at)));
            }
            Token::Ident("sleep") if !in_test => {
                offences.push(format!("{}: sleeps", line(at)));
            }
            Token::Ident(clock @ ("Instant" | "SystemTime"))
                if !in_test
                    && after(1) == Some(Token::PathSep)
                    && after(2) == Some(Token::Ident("now")) =>
            {
                offences.push(format!("{}: reads the clock (`{clock}::now`)", line(at)));
            }
            // A path root: an identifier followed by `::` and not preceded
            // by one, or the first segment after a leading `::`.
            Token::Ident(name) if after(1) == Some(Token::PathSep) => {
                let absolute = before == Some(Token::PathSep)
                    && i >= 2
                    && match tokens[i - 2].1 {
                        Token::Ident(word) => ["use", "return", "in"].contains(&word),
                        Token::Punct(c) => c != '>',
                        Token::PathSep => false,
                    };
                if before == Some(Token::PathSep) && !absolute {
                    continue;
                }
                let turbofish = after(2) == Some(Token::Punct('<'));
                let own = !absolute && (modules.contains(name) || imported.contains(name));
                let typed = name.starts_with(|c: char| c.is_ascii_uppercase());
                if turbofish || own || typed || ALLOWED_ROOTS.contains(&name) {
                    continue;
                }
                let offence = match name {
                    "crate" => match after(2) {
                        Some(Token::Ident("core")) => continue,
                        Some(Token::Ident(module)) => {
                            format!("`crate::{module}` is outside the core")
                        }
                        _ => "`crate::{` may reach outside the core".to_owned(),
                    },
                    "super" => {
                        let mut ups = 0;
                        while tokens.get(i + 2 * ups).map(|t| t.1) == Some(Token::Ident("super"))
                            && tokens.get(i + 2 * ups + 1).map(|t| t.1) == Some(Token::PathSep)
                        {
                            ups += 1;
                        }
                        let here = depth + braces.iter().filter(|b| b.0).count();
                        if ups <= here {
                            continue;
                        }
                        format!("`{}` leaves the core", "super::".repeat(ups))
                    }
                    _ => format!("`{name}::` is neither the core's nor an allowed crate"),
                };
                offences.push(format!("{}: {offence}", line(at)));
            }
            _ => {}
        }
    }
    offences.dedup();
    offences
}

/// The names a file's `use` declarations bring in: the last segment of
/// each path (or its `as` name), whose root is checked where it stands, so
/// that after `use std::collections::btree_map;`, `btree_map::Entry` is the
/// standard library's.
fn imported_names<'a>(tokens: &[(usize, Token<'a>)]) -> BTreeSet<&'a str> {
    let mut names = BTreeSet::new();
    let mut in_use = false;
    for (i, &(_, token)) in tokens.iter().enumerate() {
        let before = i.checked_sub(1).map(|j| tokens[j].1);
        let after = tokens.get(i + 1).map(|t| t.1);
        match token {
            Token::Ident("use") => in_use = true,
            Token::Punct(';') => in_use = false,
            Token::Ident(name)
                if in_use
                    && after != Some(Token::PathSep)
                    && before != Some(Token::Ident("use")) =>
            {
                names.insert(name);
            }
            _ => {}
        }
    }
    names
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token<'a> {
    Ident(&'a str),
    /// `::`
    PathSep,
    Punct(char),
}

/// The tokens of code whose comments and literals are blanked, each with
/// its byte offset.
fn tokens(code: &str) -> Vec<(usize, Token<'_>)> {
    let bytes = code.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            let mut ident = &code[start..i];
            // A raw identifier, `r#tokio`, names the same thing.
            if ident == "r" && bytes.get(i) == Some(&b'#') {
                let raw = i + 1;
                i = raw;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                ident = &code[raw..i];
            }
            tokens.push((start, Token::Ident(ident)));
        } else if c == b':' && bytes.get(i + 1) == Some(&b':') {
            tokens.push((i, Token::PathSep));
            i += 2;
        } else {
            if !c.is_ascii_whitespace() {
                tokens.push((i, Token::Punct(c as char)));
            }
            i += 1;
        }
    }
    tokens
}

/// `source` with comments, string literals and character literals replaced
/// by spaces (newlines kept, so that offsets and lines stay as they were).
fn strip(source: &str) -> String {
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let mut i = 0;
    // Blanks chars[from..to] into `out`.
    let blank = |out: &mut String, chars: &[char], from: usize, to: usize| {
        for &c in &chars[from..to.min(chars.len())] {
            if c == '\n' {
                out.push('\n');
            } else {
                out.extend(std::iter::repeat_n(' ', c.len_utf8()));
            }
        }
    };
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        let ident_before = i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
        let end = if c == '/' && at(i + 1) == '/' {
            let mut j = i;
            while j < chars.len() && chars[j] != '\n' {
                j += 1;
            }
            j
        } else if c == '/' && at(i + 1) == '*' {
            // Block comments nest.
            let (mut j, mut open) = (i + 2, 1);
            while j < chars.len() && open > 0 {
                if chars[j] == '/' && at(j + 1) == '*' {
                    open += 1;
                    j += 2;
                } else if chars[j] == '*' && at(j + 1) == '/' {
                    open -= 1;
                    j += 2;
                } else {
                    j += 1;
                }
            }
            j
        } else if !ident_before && (c == 'r' || (c == 'b' && at(i + 1) == 'r')) && {
            let mut j = i + if c == 'b' { 2 } else { 1 };
            while at(j) == '#' {
                j += 1;
            }
            at(j) == '"'
        } {
            // A raw string: r"…", r#"…"#, br"…".
            let mut j = i + if c == 'b' { 2 } else { 1 };
            let mut hashes = 0;
            while at(j) == '#' {
                hashes += 1;
                j += 1;
            }
            j += 1;
            loop {
                if j >= chars.len() {
                    break j;
                }
                if chars[j] == '"' && (1..=hashes).all(|k| at(j + k) == '#') {
                    break j + 1 + hashes;
                }
                j += 1;
            }
        } else if c == '"' {
            let mut j = i + 1;
            while j < chars.len() && chars[j] != '"' {
                j += if chars[j] == '\\' { 2 } else { 1 };
            }
            j + 1
        } else if c == '\'' && (at(i + 1) == '\\' || at(i + 2) == '\'') {
            // A character literal, not a lifetime.
            let mut j = i + 1;
            while j < chars.len() && chars[j] != '\'' {
                j += if chars[j] == '\\' { 2 } else { 1 };
            }
            j + 1
        } else {
            out.push(c);
            i += 1;
            continue;
        };
        blank(&mut out, &chars, i, end);
        i = end;
    }
    out
}
