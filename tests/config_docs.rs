//! The README's configuration table against the binary: every option
//! `switchboard --help` lists has a row, every row names a real option, and
//! every row's key is accepted in the TOML file by the config loader (rows
//! marked "command line only" excepted), so the three cannot drift apart.

use std::collections::BTreeSet;
use std::process::Command;

use switchboard::config::Settings;

/// Words in a row's text that mark a flag with no TOML key.
const CLI_ONLY: &str = "command line only";

/// The long options `--help` lists, without `--help` and `--version`.
fn help_options() -> BTreeSet<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    help.lines()
        .filter_map(|line| {
            let line = line.trim_start();
            // `--flag <VALUE>`, `--flag`, or `-h, --help`.
            let rest = line.strip_prefix("--").or_else(|| {
                let (short, rest) = line.split_once(", --")?;
                (short.len() == 2 && short.starts_with('-')).then_some(rest)
            })?;
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            (!name.is_empty() && name != "help" && name != "version").then_some(name)
        })
        .collect()
}

/// The README's configuration table: each row's flags (first column, one
/// or more `--name`) and whether the row says it is command line only.
fn readme_rows() -> Vec<(Vec<String>, bool)> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let table = readme
        .lines()
        .skip_while(|l| !l.starts_with("| flag |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'));
    table
        .map(|row| {
            let first = row.split('|').nth(1).unwrap_or_default();
            let flags = first
                .split('`')
                .filter_map(|part| part.trim().strip_prefix("--"))
                .map(|f| f.split([' ', '=']).next().unwrap_or_default().to_string())
                .collect::<Vec<_>>();
            assert!(
                !flags.is_empty(),
                "a README table row without a flag: {row}"
            );
            (flags, row.contains(CLI_ONLY))
        })
        .collect()
}

/// Whether the TOML file may set `key`: the loader accepts `key = V` for
/// one of a few sample values (whatever the option's type).
fn toml_accepts(key: &str) -> Result<(), String> {
    const SAMPLES: &[&str] = &[
        "1",
        "true",
        "\"1s\"",
        "\"127.0.0.1\"",
        "\"disconnect\"",
        "\"json\"",
        "\"x\"",
        "[\"x\"]",
    ];
    let dir = std::env::temp_dir().join(format!("sb-config-docs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{key}.toml"));
    let mut last = String::new();
    for sample in SAMPLES {
        std::fs::write(&file, format!("{key} = {sample}\n")).unwrap();
        match Settings::from_file(&file) {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

#[test]
fn every_option_is_in_the_readme_table_and_the_toml_file() {
    let options = help_options();
    assert!(options.len() > 20, "--help parsed: {options:?}");
    let rows = readme_rows();
    let documented: BTreeSet<String> = rows.iter().flat_map(|(f, _)| f.clone()).collect();

    let missing: Vec<_> = options.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "options in --help without a row in the README's configuration table: {missing:?}"
    );
    let stale: Vec<_> = documented.difference(&options).collect();
    assert!(
        stale.is_empty(),
        "README configuration rows for options --help does not list: {stale:?}"
    );

    let mut refused = Vec::new();
    for (flags, cli_only) in &rows {
        for flag in flags {
            let key = flag.replace('-', "_");
            match toml_accepts(&key) {
                Ok(()) if *cli_only => refused.push(format!(
                    "{key}: accepted in TOML but the row says {CLI_ONLY:?}"
                )),
                Err(e) if !cli_only => refused.push(format!("{key}: {e}")),
                _ => {}
            }
        }
    }
    assert!(
        refused.is_empty(),
        "README table vs TOML file: {refused:#?}"
    );
}
