//! Command-line flag structs carried as `name -> value` text maps (`JobSpec.args`): the one
//! encoding and decoding both flag sets use.

use serde::Serialize;
use std::collections::BTreeMap;

/// The struct's fields as `{prefix}{name} -> value` text (absent options are left out).
pub(crate) fn to_map<T: Serialize>(args: &T, prefix: &str) -> BTreeMap<String, String> {
    let value = serde_json::to_value(args).expect("flag structs always serialise");
    let mut map = BTreeMap::new();
    if let serde_json::Value::Object(fields) = value {
        for (name, v) in fields {
            let text = match v {
                serde_json::Value::Null => continue,
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            map.insert(format!("{prefix}{name}"), text);
        }
    }
    map
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
