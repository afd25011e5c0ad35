//! Rendering: aligned text tables for people, JSON for programs.

use serde::Serialize;

use super::{CliError, Format};

/// Prints rows as an aligned table, or the value as pretty JSON.
pub fn print<T: Serialize>(
    format: Format,
    json: &T,
    headers: &[&str],
    rows: Vec<Vec<String>>,
) -> Result<(), CliError> {
    match format {
        Format::Json => {
            let s = serde_json::to_string_pretty(json).map_err(|e| CliError::Output(e.to_string()))?;
            println!("{s}");
        }
        Format::Table => print!("{}", table(headers, &rows)),
    }
    Ok(())
}

/// One value as a line of compact JSON, for streams read line by line.
pub fn print_line<T: Serialize>(json: &T) -> Result<(), CliError> {
    let s = serde_json::to_string(json).map_err(|e| CliError::Output(e.to_string()))?;
    println!("{s}");
    Ok(())
}

/// An aligned text table with a header line.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{:<w$}  ", c, w = widths[i]));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

/// A byte count in binary units (`1.5 GiB`).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// How long ago a Unix-milliseconds time was (`12 s ago`).
pub fn time_ms(ms: u64) -> String {
    let secs = nodeos_types::unix_millis().saturating_sub(ms) / 1000;
    format!("{secs} s ago")
}

/// A deletion: one line for people, the deleted record for programs.
pub fn print_deleted<T: Serialize>(format: Format, json: &T, what: String) -> Result<(), CliError> {
    match format {
        Format::Json => print(format, json, &[], vec![]),
        Format::Table => {
            println!("deleted {what}");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t =
            table(&["ID", "ROLE"], &[vec!["a".into(), "leader".into()], vec!["bbbb".into(), "voter".into()]]);
        assert_eq!(t, "ID    ROLE\na     leader\nbbbb  voter\n");
    }
}
