//! Command-line flag structs carried as `name -> value` text maps (`JobSpec.args`): the one
//! encoding and decoding both flag sets use, and the command line that encodes a struct.

use serde::Serialize;
use std::collections::BTreeMap;

/// The struct's fields as `({prefix}{name}, value)` text in declaration order (absent options
/// are left out).
fn to_pairs<T: Serialize>(args: &T, prefix: &str) -> Vec<(String, String)> {
    let value = serde_json::to_value(args).expect("flag structs always serialise");
    let mut pairs = Vec::new();
    if let serde_json::Value::Object(fields) = value {
        for (name, v) in fields {
            let text = match v {
                serde_json::Value::Null => continue,
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            pairs.push((format!("{prefix}{name}"), text));
        }
    }
    pairs
}

/// The struct's fields as `{prefix}{name} -> value` text (absent options are left out).
pub(crate) fn to_map<T: Serialize>(args: &T, prefix: &str) -> BTreeMap<String, String> {
    to_pairs(args, prefix).into_iter().collect()
}

/// `--name value` arguments for the entries `select` keeps (it returns the flag name).
pub(crate) fn to_argv<'a>(
    map: impl IntoIterator<Item = (&'a String, &'a String)>,
    select: impl Fn(&str) -> Option<&str>,
) -> Vec<String> {
    let mut argv = Vec::new();
    for (name, value) in map {
        if let Some(flag) = select(name) {
            argv.push(format!("--{flag}"));
            argv.push(value.clone());
        }
    }
    argv
}

/// `--name value` arguments, in declaration order, for the fields of `args` whose text differs
/// from that of `defaults`: the shortest command line that parses back to `args` (an option left
/// out of `args` has no command-line form, so none of the defaults may set one).
pub(crate) fn changed_argv<T: Serialize>(args: &T, defaults: &T) -> Vec<String> {
    let defaults = to_map(defaults, "");
    let pairs = to_pairs(args, "");
    let changed = pairs
        .iter()
        .filter(|(name, value)| defaults.get(name) != Some(value))
        .map(|(name, value)| (name, value));
    to_argv(changed, |name| Some(name))
}
