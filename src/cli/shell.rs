//! `mybox shell`: the assignment's prompt. Accepts its spellings in any case (`index longlist`,
//! `hash checkall`, `download UDP notes.txt`), keeps one connection to the peer open between
//! commands, and reads plain lines when stdin is not a terminal so it can be scripted.

use std::io::{BufRead, IsTerminal};

use clap::Parser;

use super::{run_query, Cli, Command, QueryOpts};
use crate::client::Session;
use crate::config::BoxDir;

/// Turn a typed line into argv for the `mybox` parser: command words lowercased (file names
/// keep their case), shell-style quoting honoured.
pub fn to_argv(line: &str) -> Result<Vec<String>, String> {
    let words = shlex::split(line).ok_or_else(|| "unbalanced quotes".to_string())?;
    let mut argv = vec!["mybox".to_string()];
    for (i, w) in words.into_iter().enumerate() {
        let lower = w.to_lowercase();
        let is_keyword = match i {
            0 => true,
            1 => matches!(argv[1].as_str(), "index" | "hash" | "download" | "peer"),
            _ => false,
        };
        argv.push(if is_keyword { lower } else { w });
    }
    Ok(argv)
}

const HELP: &str = "commands:
  index longlist | index shortlist START END | index regex PATTERN
  hash verify FILE | hash checkall
  download tcp FILE [-o PATH] | download udp FILE [-o PATH]
  options: --json, --local, --peer ID;  help;  quit";

pub async fn run(b: BoxDir, opts: QueryOpts) -> anyhow::Result<()> {
    let interactive = std::io::stdin().is_terminal();
    let mut session: Option<Session> = None;
    let mut failures = 0usize;
    let mut editor = if interactive {
        let mut ed = rustyline::DefaultEditor::new()?;
        let _ = ed.load_history(&b.meta().join("shell_history"));
        println!("mybox shell on {} — type help, or quit", b.root.display());
        Some(ed)
    } else {
        None
    };
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        let line = match &mut editor {
            Some(ed) => match ed.readline("mybox> ") {
                Ok(l) => {
                    let _ = ed.add_history_entry(l.as_str());
                    l
                }
                Err(rustyline::error::ReadlineError::Interrupted) => continue,
                Err(_) => break,
            },
            None => match lines.next() {
                Some(Ok(l)) => l,
                Some(Err(e)) => return Err(e.into()),
                None => break,
            },
        };
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.to_lowercase().as_str() {
            "quit" | "exit" => break,
            "help" | "?" => {
                println!("{HELP}");
                continue;
            }
            _ => {}
        }
        if let Err(e) = one(&b, &opts, line, &mut session).await {
            eprintln!("error: {}", super::one_line(&e));
            failures += 1;
            // A broken connection is reopened by the next command.
            if session
                .as_ref()
                .map(|s| s.conn.is_closed())
                .unwrap_or(false)
            {
                session = None;
            }
        }
    }
    if let Some(ed) = &mut editor {
        let _ = ed.save_history(&b.meta().join("shell_history"));
    }
    if failures > 0 && !interactive {
        anyhow::bail!("{failures} command(s) failed");
    }
    Ok(())
}

async fn one(
    b: &BoxDir,
    opts: &QueryOpts,
    line: &str,
    session: &mut Option<Session>,
) -> anyhow::Result<()> {
    let argv = to_argv(line).map_err(|e| anyhow::anyhow!(e))?;
    let cli = Cli::try_parse_from(&argv).map_err(|e| {
        let text = e.to_string();
        anyhow::anyhow!(
            "{}",
            text.lines()
                .next()
                .unwrap_or("bad command")
                .trim_start_matches("error: ")
        )
    })?;
    let local = opts.local || cli.local;
    let peer = cli.peer.clone().or(opts.peer.clone());
    let q = QueryOpts {
        json: opts.json || cli.json,
        local,
        peer,
    };
    match cli.command {
        cmd @ (Command::Index(_) | Command::Hash(_) | Command::Download { .. }) => {
            // Reuse the open connection when it goes to the same place.
            let reuse = matches!(session, Some(s) if !s.conn.is_closed() && (s.peer_label == "self") == local)
                && q.peer.is_none();
            if !reuse {
                *session = Some(super::open_session(b, &q).await?);
            }
            let s = session
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("no session"))?;
            run_query(s, cmd, &q).await
        }
        other => anyhow::bail!(
            "not available in the shell: {}",
            format!("{other:?}").split_whitespace().next().unwrap_or("")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_spellings() {
        assert_eq!(
            to_argv("download UDP Notes.txt").unwrap(),
            ["mybox", "download", "udp", "Notes.txt"]
        );
        assert_eq!(
            to_argv("INDEX LongList").unwrap(),
            ["mybox", "index", "longlist"]
        );
        assert_eq!(
            to_argv("index regex 'A b'").unwrap(),
            ["mybox", "index", "regex", "A b"]
        );
        assert!(to_argv("index regex 'open").is_err());
        assert!(Cli::try_parse_from(to_argv("hash checkall").unwrap()).is_ok());
        assert!(Cli::try_parse_from(to_argv("Download TCP x --json").unwrap()).is_ok());
    }
}
