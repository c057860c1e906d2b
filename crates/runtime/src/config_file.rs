//! The optional TOML configuration file of a daemon (`--config FILE` or
//! `BERTH_CONFIG`). Its keys are the daemon's long flag names (`front-port =
//! 2376`, `no-netns = true`, `tls-san = ["a", "b"]`); a flag given on the
//! command line or through its `BERTH_*` environment twin overrides the
//! file.
//!
//! The file is turned into command-line arguments placed in front of the
//! real ones, for exactly the settings that neither the command line nor the
//! environment gives, so clap still parses and validates everything and
//! `--help` stays the one reference. Each value is checked with its flag's
//! own parser first: a bad file fails with one line naming the file, the key
//! and what is wrong with the value.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, Command};

/// The flag naming the file, and its environment twin.
pub const CONFIG_FLAG: &str = "config";
pub const CONFIG_ENV: &str = "BERTH_CONFIG";

/// What is wrong with a configuration file; every message is one line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigFileError {
    #[error("configuration file {path}: cannot read it: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("configuration file {path}: not valid TOML: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error(
        "configuration file {path}: unknown setting {key:?} (settings are the long flags of --help)"
    )]
    UnknownKey { path: PathBuf, key: String },
    #[error("configuration file {path}: setting {key:?}: {reason}")]
    BadValue {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("--config needs a file name")]
    NoFileName,
}

/// The file named by `--config FILE` / `--config=FILE` in `args` (after the
/// program name), else by `BERTH_CONFIG`.
pub fn config_path(args: &[OsString]) -> Result<Option<PathBuf>, ConfigFileError> {
    let flag = format!("--{CONFIG_FLAG}");
    let prefix = format!("--{CONFIG_FLAG}=");
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let Some(s) = a.to_str() else { continue };
        if s == "--" {
            break;
        }
        if s == flag {
            return match it.next() {
                Some(v) if !v.is_empty() => Ok(Some(PathBuf::from(v))),
                _ => Err(ConfigFileError::NoFileName),
            };
        }
        if let Some(v) = s.strip_prefix(&prefix) {
            if v.is_empty() {
                return Err(ConfigFileError::NoFileName);
            }
            return Ok(Some(PathBuf::from(v)));
        }
    }
    Ok(std::env::var_os(CONFIG_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from))
}

/// A daemon's command line merged with `--config FILE` (flags and BERTH_*
/// win). Bad configuration is one line on stderr, named after `program`,
/// and exit status 2; `--help` and `--version` print and exit.
pub fn parse<C: clap::Parser>(program: &str) -> Result<C, std::process::ExitCode> {
    let cmd = C::command();
    let args =
        merge_args(&cmd, std::env::args_os().collect()).map_err(|e| bad_config(program, e))?;
    let matches = match cmd.try_get_matches_from(args) {
        Ok(m) => m,
        Err(e) if e.use_stderr() => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            return Err(bad_config(program, first.trim_start_matches("error: ")));
        }
        // --help, --version.
        Err(e) => e.exit(),
    };
    C::from_arg_matches(&matches).map_err(|e| bad_config(program, e.to_string().trim()))
}

/// Bad configuration: one line on stderr, exit status 2.
pub fn bad_config(program: &str, what: impl std::fmt::Display) -> std::process::ExitCode {
    eprintln!("{program}: {what}");
    std::process::ExitCode::from(2)
}

/// `args` with the settings of the configuration file (if one is named)
/// put in front, for every setting the command line and the environment
/// leave open. `cmd` is the daemon's clap command.
pub fn merge_args(cmd: &Command, args: Vec<OsString>) -> Result<Vec<OsString>, ConfigFileError> {
    let Some(path) = config_path(&args)? else {
        return Ok(args);
    };
    let text = std::fs::read_to_string(&path).map_err(|e| ConfigFileError::Read {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let from_file = file_args(cmd, &path, &text, &args, |k| std::env::var_os(k))?;
    let mut out = Vec::with_capacity(args.len() + from_file.len());
    let mut rest = args.into_iter();
    out.extend(rest.next());
    out.extend(from_file);
    out.extend(rest);
    Ok(out)
}

/// The arguments the file `text` stands for. `env` reads the environment
/// (a parameter, so tests need not change the process environment).
pub fn file_args(
    cmd: &Command,
    path: &Path,
    text: &str,
    cmdline: &[OsString],
    env: impl Fn(&OsStr) -> Option<OsString>,
) -> Result<Vec<OsString>, ConfigFileError> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigFileError::Parse {
            path: path.to_owned(),
            reason: one_line(&e.to_string()),
        })?;
    let mut out = Vec::new();
    for (key, value) in &table {
        let bad = |reason: String| ConfigFileError::BadValue {
            path: path.to_owned(),
            key: key.clone(),
            reason,
        };
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && key != CONFIG_FLAG)
            .ok_or_else(|| ConfigFileError::UnknownKey {
                path: path.to_owned(),
                key: key.clone(),
            })?;
        if given_on_cmdline(cmdline, key) || given_in_env(arg, &env) {
            continue;
        }
        let flag = format!("--{key}");
        match arg.get_action() {
            ArgAction::SetTrue | ArgAction::SetFalse => match value {
                toml::Value::Boolean(b) => {
                    let wanted = matches!(arg.get_action(), ArgAction::SetTrue);
                    if *b == wanted {
                        out.push(OsString::from(&flag));
                    }
                }
                other => {
                    return Err(bad(format!(
                        "must be true or false, not a {}",
                        other.type_str()
                    )));
                }
            },
            ArgAction::Append => {
                let items: Vec<&toml::Value> = match value {
                    toml::Value::Array(a) => a.iter().collect(),
                    v => vec![v],
                };
                for item in items {
                    let v = scalar(item).map_err(&bad)?;
                    check(cmd, arg, &v).map_err(&bad)?;
                    out.push(OsString::from(format!("{flag}={v}")));
                }
            }
            _ => {
                let v = scalar(value).map_err(&bad)?;
                check(cmd, arg, &v).map_err(&bad)?;
                out.push(OsString::from(format!("{flag}={v}")));
            }
        }
    }
    Ok(out)
}

fn given_on_cmdline(cmdline: &[OsString], key: &str) -> bool {
    let flag = format!("--{key}");
    let with_value = format!("--{key}=");
    cmdline
        .iter()
        .skip(1)
        .take_while(|a| a.to_str() != Some("--"))
        .filter_map(|a| a.to_str())
        .any(|a| a == flag || a.starts_with(&with_value))
}

fn given_in_env(arg: &Arg, env: &impl Fn(&OsStr) -> Option<OsString>) -> bool {
    arg.get_env().and_then(env).is_some_and(|v| !v.is_empty())
}

/// A TOML scalar as the text a flag takes.
fn scalar(v: &toml::Value) -> Result<String, String> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        toml::Value::Datetime(d) => Ok(d.to_string()),
        toml::Value::Array(_) => Err("takes one value, not a list".into()),
        toml::Value::Table(_) => Err("takes a value, not a table".into()),
    }
}

/// Runs the flag's own value parser on `v` (by parsing `--KEY=v` alone
/// with the daemon's command), for an error that names the key. Errors
/// about anything else (a required flag missing here) are not this value's.
fn check(cmd: &Command, arg: &Arg, v: &str) -> Result<(), String> {
    let Some(long) = arg.get_long() else {
        return Ok(());
    };
    let name = cmd.get_name().to_owned();
    let result = cmd
        .clone()
        .try_get_matches_from([name, format!("--{long}={v}")]);
    match result {
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::InvalidValue
                    | clap::error::ErrorKind::ValueValidation
                    | clap::error::ErrorKind::InvalidUtf8
            ) =>
        {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            let mentions =
                first.contains(&format!("'--{long} ")) || first.contains(&format!("'--{long}'"));
            if mentions {
                Err(first.trim_start_matches("error: ").to_owned())
            } else {
                Ok(())
            }
        }
        _ => Ok(()),
    }
}

/// Multi-line parser messages (with a source excerpt) as one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::{CommandFactory, Parser};
    use std::time::Duration;

    #[derive(Debug, Parser)]
    struct Demo {
        #[arg(long, env = "DEMO_CONFIG_UNUSED")]
        config: Option<PathBuf>,
        #[arg(long, env = "DEMO_PORT", default_value_t = 1)]
        port: u16,
        #[arg(long, env = "DEMO_NAME", default_value = "n")]
        name: String,
        #[arg(long, env = "DEMO_FLAG")]
        flag: bool,
        #[arg(long, default_value = "1s", value_parser = humantime_like)]
        wait: Duration,
        #[arg(long, value_delimiter = ',')]
        san: Vec<String>,
    }

    fn humantime_like(s: &str) -> Result<Duration, String> {
        s.strip_suffix('s')
            .and_then(|n| n.parse().ok())
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{s:?} is not a number of seconds"))
    }

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn parse(text: &str, cmdline: &[&str], env: &[(&str, &str)]) -> Result<Demo, ConfigFileError> {
        let cmd = Demo::command();
        let cmdline = args(cmdline);
        let env: Vec<(OsString, OsString)> =
            env.iter().map(|(k, v)| (k.into(), v.into())).collect();
        let extra = file_args(&cmd, Path::new("/etc/demo.toml"), text, &cmdline, |k| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })?;
        let mut all = vec![cmdline[0].clone()];
        all.extend(extra);
        all.extend(cmdline.into_iter().skip(1));
        Ok(Demo::try_parse_from(all).unwrap())
    }

    #[test]
    fn file_values_fill_what_flags_leave_open() {
        let d = parse(
            "port = 7\nname = \"x\"\nflag = true\nwait = \"5s\"\nsan = [\"a\", \"b\"]\n",
            &["demo"],
            &[],
        )
        .unwrap();
        assert_eq!(
            (d.port, d.name.as_str(), d.flag, d.wait, d.san),
            (
                7,
                "x",
                true,
                Duration::from_secs(5),
                vec!["a".into(), "b".into()]
            )
        );
    }

    #[test]
    fn flags_and_env_override_the_file() {
        let d = parse("port = 7\n", &["demo", "--port", "9"], &[]).unwrap();
        assert_eq!(d.port, 9);
        // A setting whose BERTH_* twin is set is left to clap, which reads
        // the environment itself.
        let cmd = Demo::command();
        let extra = file_args(
            &cmd,
            Path::new("/etc/demo.toml"),
            "port = 7\nname = \"x\"\n",
            &args(&["demo"]),
            |k| (k == "DEMO_NAME").then(|| OsString::from("from-env")),
        )
        .unwrap();
        assert_eq!(extra, args(&["--port=7"]));
        let d = parse("port = 7\n", &["demo", "--port=8"], &[]).unwrap();
        assert_eq!(d.port, 8);
        // An empty environment variable does not count as set.
        let d = parse("name = \"x\"\n", &["demo"], &[("DEMO_NAME", "")]).unwrap();
        assert_eq!(d.name, "x");
        // false leaves a switch off.
        let d = parse("flag = false\n", &["demo"], &[]).unwrap();
        assert!(!d.flag);
    }

    #[test]
    fn bad_files_name_the_setting_in_one_line() {
        let cases: &[(&str, &str)] = &[
            (
                "port = \"many\"\n",
                "setting \"port\": invalid value 'many' for '--port <PORT>'",
            ),
            ("port = 70000\n", "setting \"port\": invalid value '70000'"),
            (
                "flag = \"yes\"\n",
                "setting \"flag\": must be true or false",
            ),
            (
                "wait = \"soon\"\n",
                "setting \"wait\": invalid value 'soon'",
            ),
            ("prot = 1\n", "unknown setting \"prot\""),
            ("config = \"/x\"\n", "unknown setting \"config\""),
            ("port = [1]\n", "setting \"port\": takes one value"),
            ("port = \n", "not valid TOML"),
        ];
        for (text, want) in cases {
            let e = parse(text, &["demo"], &[]).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(e.contains("/etc/demo.toml"), "{e}");
            assert!(!e.contains('\n'), "not one line: {e:?}");
        }
    }

    #[test]
    fn the_file_is_found_on_the_command_line() {
        assert_eq!(
            config_path(&args(&["d", "--port", "1", "--config", "/a.toml"])).unwrap(),
            Some(PathBuf::from("/a.toml"))
        );
        assert_eq!(
            config_path(&args(&["d", "--config=/b.toml"])).unwrap(),
            Some(PathBuf::from("/b.toml"))
        );
        assert_eq!(
            config_path(&args(&["d", "--config"])),
            Err(ConfigFileError::NoFileName)
        );
        assert_eq!(
            config_path(&args(&["d", "--", "--config", "/c"])).unwrap(),
            std::env::var_os(CONFIG_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        );
    }

    #[test]
    fn a_missing_file_is_one_clear_line() {
        let cmd = Demo::command();
        let e = merge_args(&cmd, args(&["d", "--config", "/nonexistent/berth.toml"]))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("configuration file /nonexistent/berth.toml: cannot read it"),
            "{e}"
        );
        assert!(!e.contains('\n'));
    }
}
