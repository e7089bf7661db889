//! What the query commands print: an aligned table for people, one JSON document for scripts.

use indicatif::{ProgressBar, ProgressStyle};

use crate::client::Downloaded;
use crate::model::{hex, EntryInfo};
use crate::timeparse::format_ns;

/// The `--json` shape of one entry.
pub fn entry_json(e: &EntryInfo, with_hashes: bool) -> serde_json::Value {
    let mut v = serde_json::json!({
        "path": e.path.as_str(),
        "kind": e.kind.as_str(),
        "size": e.size,
        "mtime": format_ns(e.mtime_ns),
        "mode": format!("{:04o}", e.mode),
        "mime": e.mime,
    });
    if let Some(t) = &e.target {
        v["target"] = serde_json::Value::String(t.clone());
    }
    if with_hashes {
        v["md5"] = e.md5.map(|h| hex(&h)).into();
        v["sha256"] = e.sha256.map(|h| hex(&h)).into();
    }
    v
}

pub fn human_size(n: u64) -> String {
    humansize::format_size(
        n,
        humansize::BINARY.decimal_places(1).space_after_value(true),
    )
}

fn local_time(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    match chrono::DateTime::from_timestamp(secs, 0) {
        Some(t) => t
            .with_timezone(&chrono::Local)
            .format("%Y-%m-%d %H:%M:%S")
            .to_string(),
        None => format!("@{secs}"),
    }
}

fn mode_string(kind: crate::model::Kind, mode: u32) -> String {
    let t = match kind {
        crate::model::Kind::Dir => 'd',
        crate::model::Kind::Symlink => 'l',
        crate::model::Kind::File => '-',
    };
    let mut s = String::from(t);
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

pub fn print_entries(entries: &[EntryInfo], json: bool, with_hashes: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if json {
        let v: Vec<_> = entries.iter().map(|e| entry_json(e, with_hashes)).collect();
        serde_json::to_writer_pretty(&mut out, &v)?;
        writeln!(out)?;
        return Ok(());
    }
    if entries.is_empty() {
        writeln!(out, "(no matching files)")?;
        return Ok(());
    }
    // Cells as plain strings, then one pass to size the columns and one to write: the layout
    // comfy_table's NOTHING preset gives (one space either side of each cell, SIZE aligned
    // right), without keeping 100,000 styled rows (half of a 100k-file longlist's time).
    let (header, right, rows): (&[&str], &[bool], Vec<Vec<String>>) = if with_hashes {
        (
            &["PATH", "SIZE", "MODIFIED", "MD5", "SHA256"],
            &[false, true, false, false, false],
            entries
                .iter()
                .map(|e| {
                    vec![
                        e.path.to_string(),
                        human_size(e.size),
                        local_time(e.mtime_ns),
                        e.md5.map(|h| hex(&h)).unwrap_or_default(),
                        e.sha256.map(|h| hex(&h)).unwrap_or_default(),
                    ]
                })
                .collect(),
        )
    } else {
        (
            &["PATH", "KIND", "SIZE", "MODIFIED", "MODE", "TYPE"],
            &[false, false, true, false, false, false],
            entries
                .iter()
                .map(|e| {
                    vec![
                        match &e.target {
                            Some(target) => format!("{} -> {}", e.path, target),
                            None => e.path.to_string(),
                        },
                        e.kind.as_str().to_string(),
                        human_size(e.size),
                        local_time(e.mtime_ns),
                        mode_string(e.kind, e.mode),
                        e.mime.clone(),
                    ]
                })
                .collect(),
        )
    };
    write_table(&mut out, header, right, &rows)?;
    writeln!(
        out,
        "{} {}",
        entries.len(),
        if entries.len() == 1 {
            "entry"
        } else {
            "entries"
        }
    )?;
    Ok(())
}

/// Columns padded to their widest cell (display width), one space either side, trailing
/// blanks trimmed. `right[i]` aligns data cells of column i to the right (headers stay left).
fn write_table(
    out: &mut impl std::io::Write,
    header: &[&str],
    right: &[bool],
    rows: &[Vec<String>],
) -> std::io::Result<()> {
    use unicode_width::UnicodeWidthStr;
    let mut widths: Vec<usize> = header.iter().map(|h| h.width()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.width());
        }
    }
    let mut line = String::new();
    let mut emit = |cells: &mut dyn Iterator<Item = &str>, is_header: bool| {
        line.clear();
        for (i, c) in cells.enumerate() {
            let pad = widths[i].saturating_sub(c.width());
            line.push(' ');
            if right[i] && !is_header {
                line.extend(std::iter::repeat_n(' ', pad));
                line.push_str(c);
            } else {
                line.push_str(c);
                line.extend(std::iter::repeat_n(' ', pad));
            }
            line.push(' ');
        }
        writeln!(out, "{}", line.trim_end())
    };
    emit(&mut header.iter().copied(), true)?;
    for r in rows {
        emit(&mut r.iter().map(String::as_str), false)?;
    }
    Ok(())
}

pub fn print_download(d: &Downloaded, json: bool) -> anyhow::Result<()> {
    if json {
        let mut v = entry_json(&d.entry, true);
        v["saved_to"] = d.path.display().to_string().into();
        println!("{}", serde_json::to_string_pretty(&vec![v])?);
    } else {
        println!(
            "{}  {}  {}  md5 {}",
            d.path.display(),
            human_size(d.entry.size),
            local_time(d.entry.mtime_ns),
            hex(&d.hashes.md5)
        );
    }
    Ok(())
}

/// A progress bar on stderr, only when stderr is a terminal.
pub fn progress_bar(label: &str) -> Option<ProgressBar> {
    if !super::stderr_is_terminal() {
        return None;
    }
    let b = ProgressBar::new(0);
    b.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .ok()?
        .progress_chars("=> "),
    );
    b.set_message(label.to_string());
    Some(b)
}
