//! What the project's commands share: `--generate man|bash|zsh` prints the
//! command's manual page (roff) or a shell completion script, made from its
//! clap definition, so they never drift from the options the command takes.
//! scripts/package.sh puts them in the Debian package. Hidden from `--help`:
//! it is for packagers.

use std::io::Write;

/// If the command line is `--generate WHAT` (and nothing else), prints what
/// is asked for `cmd` (a manual page of `section`) and exits; otherwise
/// returns, and the command parses its arguments as usual.
pub fn generate_if_asked(cmd: impl FnOnce() -> clap::Command, section: &'static str) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [flag, what] = args.as_slice() else {
        return;
    };
    if flag != "--generate" {
        return;
    }
    let mut out = Vec::new();
    let made = generate(cmd(), section, what, &mut out);
    let written = made.and_then(|()| std::io::stdout().lock().write_all(&out));
    match written {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("--generate {what}: {e}");
            std::process::exit(2);
        }
    }
}

/// `cmd`'s manual page (`man`, in `section`) or completions (`bash`,
/// `zsh`), into `out`.
pub fn generate(
    mut cmd: clap::Command,
    section: &'static str,
    what: &str,
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    let name = cmd.get_name().to_string();
    let shell = match what {
        "man" => return clap_mangen::Man::new(cmd).section(section).render(out),
        "bash" => clap_complete::Shell::Bash,
        "zsh" => clap_complete::Shell::Zsh,
        other => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{other:?}: say man, bash or zsh"),
            ))
        }
    };
    clap_complete::generate(shell, &mut cmd, name, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_man_page_and_completions_name_the_options() {
        let cmd = || {
            clap::Command::new("demo")
                .about("Does a thing.")
                .arg(clap::Arg::new("zone").long("zone").help("Where it runs."))
        };
        let mut man = Vec::new();
        generate(cmd(), "8", "man", &mut man).unwrap();
        let man = String::from_utf8(man).unwrap();
        assert!(man.contains(".TH demo 8") && man.contains("zone"), "{man}");
        for shell in ["bash", "zsh"] {
            let mut c = Vec::new();
            generate(cmd(), "8", shell, &mut c).unwrap();
            assert!(String::from_utf8(c).unwrap().contains("--zone"));
        }
        assert!(generate(cmd(), "8", "fish", &mut Vec::new()).is_err());
    }
}
