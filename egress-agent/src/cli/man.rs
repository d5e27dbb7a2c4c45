//! `man`: the manual pages, made from the command line's own definitions (clap_mangen), with
//! the after-help sections (examples, exit status) as roff sections.

use std::process::ExitCode;

use clap::CommandFactory as _;
use clap_mangen::Man;

use crate::cli::{Cli, EXIT_USAGE, print};

/// Prints the page of egress-agent (`None`) or of one of its commands.
pub fn execute(command: Option<&str>) -> ExitCode {
    match man_page(command) {
        Ok(page) => print(&page),
        Err(e) => {
            eprintln!("egress-agent: {e}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// The roff manual page of egress-agent (`None`) or of one of its commands.
pub fn man_page(command: Option<&str>) -> Result<String, String> {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let cmd = match command {
        None => cmd,
        Some(name) => {
            let names: Vec<String> = cmd
                .get_subcommands()
                .map(|c| c.get_name().to_string())
                .collect();
            // Built from the root, it is named egress-agent-NAME (the page's title and NAME)
            // and its synopsis reads `egress-agent NAME`.
            cmd.find_subcommand(name)
                .ok_or_else(|| format!("no command {name:?}; one of: {}", names.join(", ")))?
                .clone()
        }
    };
    let man = Man::new(cmd.clone()).source(format!("egress-agent {}", env!("CARGO_PKG_VERSION")));
    let mut out = Vec::new();
    let sections = [
        Man::render_title,
        Man::render_name_section,
        Man::render_synopsis_section,
        Man::render_description_section,
    ];
    for render in sections {
        render(&man, &mut out).map_err(|e| e.to_string())?;
    }
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut out)
            .map_err(|e| e.to_string())?;
    }
    if cmd.get_subcommands().any(|c| !c.is_hide_set()) {
        man.render_subcommands_section(&mut out)
            .map_err(|e| e.to_string())?;
    }
    // The after-help text is written in sections ("Examples:", "Exit status:") of
    // preformatted lines; clap_mangen would run them together into one paragraph.
    if let Some(after) = cmd.get_after_help() {
        out.extend_from_slice(roff_sections(&after.to_string()).as_bytes());
    }
    if cmd.get_version().is_some() {
        man.render_version_section(&mut out)
            .map_err(|e| e.to_string())?;
    }
    String::from_utf8(out).map_err(|e| e.to_string())
}

/// Text of `Heading:` lines followed by indented lines, as roff sections of unfilled lines.
/// A line `Heading: text` (text on the heading's own line) keeps its text in the section.
fn roff_sections(text: &str) -> String {
    let mut out = String::new();
    let mut open = false;
    for line in text.lines() {
        let heading = (!line.starts_with(' ') && !line.is_empty())
            .then(|| line.split_once(':'))
            .flatten()
            .filter(|(h, _)| !h.is_empty() && h.chars().all(|c| c.is_alphabetic() || c == ' '));
        if let Some((h, rest)) = heading {
            if open {
                out.push_str(".fi\n");
            }
            out.push_str(&format!(".SH \"{}\"\n.nf\n", h.to_uppercase()));
            open = true;
            if !rest.trim().is_empty() {
                out.push_str(&roff_line(rest.trim()));
            }
            continue;
        }
        if line.trim().is_empty() {
            // A blank line ends a section; inside one it would print as an empty line.
            continue;
        }
        if !open {
            out.push_str(".SH EXTRA\n.nf\n");
            open = true;
        }
        out.push_str(&roff_line(line));
    }
    if open {
        out.push_str(".fi\n");
    }
    out
}

/// One line of text for roff: backslashes and hyphens escaped, a leading `.` or `'` guarded.
fn roff_line(line: &str) -> String {
    let escaped = line.replace('\\', "\\e").replace('-', "\\-");
    if escaped.starts_with('.') || escaped.starts_with('\'') {
        format!("\\&{escaped}\n")
    } else {
        format!("{escaped}\n")
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn every_command_has_examples_and_a_man_page() {
        let root = man_page(None).unwrap();
        assert!(root.contains(".SH \"EXAMPLES\"") && root.contains(".SH \"EXIT STATUS\""));
        for sub in Cli::command().get_subcommands() {
            let name = sub.get_name();
            let help = sub
                .get_after_help()
                .map(|h| h.to_string())
                .unwrap_or_default();
            assert!(
                help.starts_with("Examples:\n") || help.starts_with("Example:\n"),
                "{name}: no examples"
            );
            let page = man_page(Some(name)).unwrap();
            assert!(
                page.contains(&format!(".TH egress-agent-{name} 1")),
                "{name}"
            );
            assert!(page.contains(".SH \"EXAMPLE"), "{name}");
        }
        assert!(man_page(Some("nope")).unwrap_err().contains("one of: run"));
    }

    #[test]
    fn roff_sections_keep_lines_and_escape() {
        assert_eq!(
            roff_sections("Examples:\n  a --b\n.c\n\nExit status: 0 if ok\n"),
            ".SH \"EXAMPLES\"\n.nf\n  a \\-\\-b\n\\&.c\n.fi\n.SH \"EXIT STATUS\"\n.nf\n0 if ok\n.fi\n"
        );
    }
}
