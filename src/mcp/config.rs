//! The downstream MCP servers, from an `.mcp.json`-style file (the format Claude Code, Cursor and
//! the MCP reference clients read):
//!
//! ```json
//! { "mcpServers": {
//!     "time":  { "command": "python3", "args": ["-m", "mcp_server_time"], "env": {"TZ": "UTC"} },
//!     "docs":  { "type": "http", "url": "http://127.0.0.1:3000/mcp",
//!                "headers": { "Authorization": "Bearer ${DOCS_TOKEN}" } }
//! } }
//! ```
//!
//! `${VAR}` and `${VAR:-default}` are expanded from the environment in commands, arguments,
//! environment values, URLs and headers (so secrets stay out of the file). Server names are what
//! personas name in `allowedServers` and `allowedTools`, and they prefix the tools hypertool
//! exposes, so they are kept to letters, digits, `-` and `_`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::error::{ConfigError, ConfigErrors};
use crate::config::spans::{self, Spans};

/// The name of hypertool's own tools (`list-personas`, `equip-persona`, `current-persona`) in
/// metrics and events; no downstream server may take it.
pub const BUILTIN_SERVER: &str = "hypertool";
/// Most downstream servers one file may declare.
pub const MAX_SERVERS: usize = 64;
/// The largest `.mcp.json` read.
const MAX_FILE_BYTES: u64 = 1 << 20;
/// A tool call that takes longer is answered with an error (the server keeps running).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// How hypertool reaches one downstream server.
#[derive(Debug, Clone, PartialEq)]
pub enum Transport {
    /// A command hypertool starts, speaking MCP on its stdin and stdout.
    Stdio {
        command: String,
        args: Vec<String>,
        env: BTreeMap<String, String>,
        cwd: Option<PathBuf>,
    },
    /// A streamable HTTP endpoint.
    Http {
        url: String,
        /// Sent with every request (may hold secrets: never logged).
        headers: BTreeMap<String, String>,
        /// CA certificates trusted beside the webpki roots (`[mcp] ca_file`, else `[tls]
        /// ca_file`; see [`McpServers::trusting`]).
        trust: crate::tls::Trust,
    },
}

/// One downstream server.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerSpec {
    pub name: String,
    pub transport: Transport,
    /// Longest a tool call may take (`"timeout_seconds"`, default 60).
    pub call_timeout: Duration,
}

impl ServerSpec {
    /// Where the server is, for logs and health: the command or the URL's origin, never headers,
    /// arguments or environment (they may carry secrets).
    pub fn describe(&self) -> String {
        match &self.transport {
            Transport::Stdio { command, .. } => format!("stdio `{command}`"),
            Transport::Http { url, .. } => {
                let origin = url
                    .split_once("://")
                    .map(|(scheme, rest)| {
                        let host = rest.split(['/', '?']).next().unwrap_or("");
                        let host = host.rsplit('@').next().unwrap_or(host);
                        format!("{scheme}://{host}")
                    })
                    .unwrap_or_else(|| "(url)".into());
                format!("http {origin}")
            }
        }
    }
}

/// The downstream servers, in name order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct McpServers {
    pub servers: Vec<ServerSpec>,
    /// The file they came from (for messages).
    pub source: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(rename = "mcpServers")]
    mcp_servers: serde_json::Map<String, serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    command: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    timeout_seconds: Option<f64>,
    /// Claude Code's per-server switch; a disabled server is skipped.
    #[serde(default)]
    disabled: bool,
}

/// Reads and checks `path`. Every problem is reported with the file and line, and what to do.
pub fn load(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<McpServers, ConfigErrors> {
    let file = path.display().to_string();
    let one =
        |line: Option<usize>, msg: String| ConfigErrors(vec![ConfigError::new(&file, line, msg)]);
    let meta = std::fs::metadata(path)
        .map_err(|e| one(None, format!("cannot read the MCP servers file: {e}")))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(one(
            None,
            format!(
                "the MCP servers file is {} bytes; at most {MAX_FILE_BYTES} are read",
                meta.len()
            ),
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| one(None, format!("cannot read the MCP servers file: {e}")))?;
    let mut servers = parse(&text, &file, env)?;
    servers.source = Some(path.to_path_buf());
    // A relative `cwd` is relative to the file, as a relative path in a config file is.
    let base = path.parent().unwrap_or(Path::new("."));
    for s in &mut servers.servers {
        if let Transport::Stdio { cwd: Some(cwd), .. } = &mut s.transport {
            if cwd.is_relative() {
                *cwd = base.join(&*cwd);
            }
        }
    }
    Ok(servers)
}

impl McpServers {
    /// Every HTTP server trusting `trust` (the configuration's `[mcp]` trust).
    pub fn trusting(mut self, trust: &crate::tls::Trust) -> McpServers {
        for s in &mut self.servers {
            if let Transport::Http { trust: t, .. } = &mut s.transport {
                *t = trust.clone();
            }
        }
        self
    }
}

/// The servers of `path` (none without one), `${VAR}` taken from this process's environment.
pub fn load_configured(path: Option<&Path>) -> Result<McpServers, ConfigErrors> {
    match path {
        Some(path) => load(path, &|k| std::env::var(k).ok()),
        None => Ok(McpServers::default()),
    }
}

/// Checks the text of an `.mcp.json` file (`file` names it in messages).
pub fn parse(
    text: &str,
    file: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<McpServers, ConfigErrors> {
    let raw: RawFile = serde_json::from_str(text).map_err(|e| {
        ConfigErrors(vec![ConfigError::new(
            file,
            Some(e.line()),
            format!("not a valid MCP servers file: {e}"),
        )
        .fix(
            "the file is JSON: {\"mcpServers\": {\"name\": {\"command\": \"…\", \"args\": […]}}}",
        )])
    })?;
    let spans = Spans::yaml(text);
    let mut errors = Vec::new();
    let mut servers = Vec::new();
    if raw.mcp_servers.len() > MAX_SERVERS {
        errors.push(ConfigError::new(
            file,
            spans.line("mcpServers"),
            format!(
                "{} servers declared; at most {MAX_SERVERS} are supported",
                raw.mcp_servers.len()
            ),
        ));
    }
    for (name, value) in &raw.mcp_servers {
        let path = format!("mcpServers.{}", spans::key(name));
        let mut entry = Entry {
            file,
            name,
            line: spans.line(&path),
            env,
            errors: &mut errors,
        };
        let timeout_line = spans.line(&format!("{path}.timeout_seconds"));
        servers.extend(entry.server(value, timeout_line));
    }
    if errors.is_empty() {
        Ok(McpServers {
            servers,
            source: None,
        })
    } else {
        Err(ConfigErrors(errors))
    }
}

/// One server's entry being checked; its problems join the file's list.
struct Entry<'a> {
    file: &'a str,
    name: &'a str,
    line: Option<usize>,
    env: &'a dyn Fn(&str) -> Option<String>,
    errors: &'a mut Vec<ConfigError>,
}

impl Entry<'_> {
    /// The server, or `None` when it is disabled or has a problem (reported).
    fn server(
        &mut self,
        value: &serde_json::Value,
        timeout_line: Option<usize>,
    ) -> Option<ServerSpec> {
        if let Err(why) = check_server_name(self.name) {
            let e = self
                .err(why)
                .fix("use letters, digits, `-` and `_` (at most 48)");
            return self.refuse(e);
        }
        let raw: RawServer = match serde_json::from_value(value.clone()) {
            Ok(r) => r,
            Err(e) => {
                let e = self.err(e.to_string()).fix(
                    "a server has `command` (+ `args`, `env`, `cwd`) or `type: \"http\"` with `url` (+ `headers`)",
                );
                return self.refuse(e);
            }
        };
        if raw.disabled {
            return None;
        }
        let call_timeout = match raw.timeout_seconds {
            None => DEFAULT_CALL_TIMEOUT,
            Some(s) if s.is_finite() && s > 0.0 && s <= 3600.0 => Duration::from_secs_f64(s),
            Some(s) => {
                let e = ConfigError::new(
                    self.file,
                    timeout_line,
                    format!(
                        "server `{}`: timeout_seconds = {s} is not between 0 and 3600",
                        self.name
                    ),
                );
                return self.refuse(e);
            }
        };
        Some(ServerSpec {
            name: self.name.to_string(),
            transport: self.transport(&raw)?,
            call_timeout,
        })
    }

    /// The transport its `type`, `command` and `url` describe.
    fn transport(&mut self, raw: &RawServer) -> Option<Transport> {
        let refusal = match (raw.kind.as_deref(), &raw.command, &raw.url) {
            (None | Some("stdio"), Some(command), None) => return self.stdio(command, raw),
            (Some(kind), None, Some(url)) if HTTP_TYPES.contains(&kind) => {
                return self.http(url, raw)
            }
            (None, None, Some(url)) => return self.http(url, raw),
            (Some("sse"), _, _) => self
                .err("the legacy SSE transport is not supported".into())
                .fix("use the server's streamable HTTP endpoint (`type: \"http\"`), or run it over stdio"),
            (Some(other), _, _) if other != "stdio" && !HTTP_TYPES.contains(&other) => self
                .err(format!("unknown type {other:?}"))
                .fix("use \"stdio\" or \"http\""),
            (_, Some(_), Some(_)) => self
                .err("has both `command` and `url`".into())
                .fix("keep one"),
            _ => self
                .err("has neither `command` (stdio) nor `url` (http), or one that does not match its `type`".into())
                .fix("add \"command\": \"…\" or \"type\": \"http\", \"url\": \"…\""),
        };
        self.refuse(refusal)
    }

    /// A local server over stdio. Every `${VAR}` is expanded (each one unset reported) before
    /// the entry is refused.
    fn stdio(&mut self, command: &str, raw: &RawServer) -> Option<Transport> {
        let command = self.expand("command", command);
        let args: Vec<Option<String>> = raw
            .args
            .iter()
            .map(|a| self.expand("an argument", a))
            .collect();
        let env = self.expand_map("env", &raw.env);
        let cwd = raw.cwd.as_deref().and_then(|c| self.expand("cwd", c));
        let (command, args, env) = (command?, args.into_iter().collect::<Option<_>>()?, env?);
        if command.trim().is_empty() {
            let e = self.err("`command` is empty".into());
            return self.refuse(e);
        }
        Some(Transport::Stdio {
            command,
            args,
            env,
            cwd: cwd.map(PathBuf::from),
        })
    }

    /// A remote server over streamable HTTP.
    fn http(&mut self, url: &str, raw: &RawServer) -> Option<Transport> {
        let url = self.expand("url", url)?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            let e = self.err("`url` must start with http:// or https://".into());
            return self.refuse(e);
        }
        Some(Transport::Http {
            url,
            headers: self.expand_map("header", &raw.headers)?,
            trust: crate::tls::Trust::default(),
        })
    }

    /// `v` with its `${VAR}`s expanded; `None` (reported) when one is not set.
    fn expand(&mut self, what: &str, v: &str) -> Option<String> {
        match expand_env(v, self.env) {
            Ok(s) => Some(s),
            Err(var) => {
                let e = self
                    .err(format!("{what} uses ${{{var}}}, which is not set"))
                    .fix(format!("export {var}=…, or write ${{{var}:-default}}"));
                self.refuse(e)
            }
        }
    }

    /// Every value of `map` expanded (each unset variable reported), or `None`.
    fn expand_map(
        &mut self,
        what: &str,
        map: &BTreeMap<String, String>,
    ) -> Option<BTreeMap<String, String>> {
        let expanded: Vec<(String, Option<String>)> = map
            .iter()
            .map(|(k, v)| (k.clone(), self.expand(&format!("{what} `{k}`"), v)))
            .collect();
        expanded
            .into_iter()
            .map(|(k, v)| v.map(|v| (k, v)))
            .collect()
    }

    fn err(&self, msg: String) -> ConfigError {
        ConfigError::new(
            self.file,
            self.line,
            format!("server `{}`: {msg}", self.name),
        )
    }

    /// Reports `e`; the entry yields no server.
    fn refuse<T>(&mut self, e: ConfigError) -> Option<T> {
        self.errors.push(e);
        None
    }
}

/// The `type`s of a streamable HTTP server, as the MCP clients spell it.
const HTTP_TYPES: [&str; 3] = ["http", "streamable-http", "streamableHttp"];

/// Server names prefix the tools hypertool exposes (`time__get_current_time`).
fn check_server_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 48 {
        return Err(format!(
            "the name is {} bytes long; 1 to 48 are accepted",
            name.len()
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err("the name may hold only letters, digits, `-` and `_`".into());
    }
    if name == BUILTIN_SERVER {
        return Err(format!(
            "`{BUILTIN_SERVER}` is the name of hypertool's own tools"
        ));
    }
    Ok(())
}

/// `${VAR}` and `${VAR:-default}` from `env`; `Err(VAR)` for the first one unset without a default.
pub fn expand_env(v: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(v.len());
    let mut rest = v;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            // Not a reference: kept as written.
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        match (env(name), default) {
            (Some(value), _) => out.push_str(&value),
            (None, Some(d)) => out.push_str(d),
            (None, None) => return Err(name.to_string()),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> Option<String> {
        (k == "TOKEN").then(|| "s3cret".to_string())
    }

    #[test]
    fn reads_stdio_and_http_servers_with_the_environment_expanded() {
        let text = r#"{"mcpServers": {
  "time": {"command": "python3", "args": ["-m", "mcp_server_time", "--local-timezone=${TZ:-UTC}"]},
  "docs": {"type": "http", "url": "http://127.0.0.1:3000/mcp", "headers": {"Authorization": "Bearer ${TOKEN}"}, "timeout_seconds": 5},
  "off": {"command": "nothing", "disabled": true}
}}"#;
        let s = parse(text, "x.json", &env).unwrap();
        let names: Vec<&str> = s.servers.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["docs", "time"]);
        let (docs, time) = (&s.servers[0], &s.servers[1]);
        assert!(matches!(&time.transport,
            Transport::Stdio { args, .. } if args[1] == "mcp_server_time" && args[2] == "--local-timezone=UTC"));
        assert!(matches!(&docs.transport,
            Transport::Http { headers, .. } if headers["Authorization"] == "Bearer s3cret"));
        assert_eq!(docs.call_timeout, Duration::from_secs(5));
        assert_eq!(time.call_timeout, DEFAULT_CALL_TIMEOUT);
        // The description never shows headers or credentials in the URL.
        assert_eq!(docs.describe(), "http http://127.0.0.1:3000");
    }

    #[test]
    fn every_mistake_is_named_with_its_line() {
        let text = "{\"mcpServers\": {\n  \"a b\": {\"command\": \"x\"},\n  \"nourl\": {\"type\": \"http\"},\n  \"sse\": {\"type\": \"sse\", \"url\": \"http://h/sse\"},\n  \"env\": {\"command\": \"${MISSING}\"},\n  \"hypertool\": {\"command\": \"x\"}\n}}";
        let errors = parse(text, "m.json", &env).unwrap_err().to_string();
        assert!(errors.contains("m.json:2: server `a b`"), "{errors}");
        assert!(
            errors.contains("m.json:3: server `nourl`: has neither"),
            "{errors}"
        );
        assert!(
            errors.contains("m.json:4: server `sse`: the legacy SSE transport"),
            "{errors}"
        );
        assert!(
            errors.contains("m.json:5: server `env`: command uses ${MISSING}"),
            "{errors}"
        );
        assert!(errors.contains("m.json:6: server `hypertool`"), "{errors}");
        let bad = parse(
            "{\"mcpServers\": {\n  \"a\": {\"command\": \"x\",}\n}}",
            "m.json",
            &env,
        )
        .unwrap_err()
        .to_string();
        assert!(
            bad.starts_with("m.json:2: not a valid MCP servers file"),
            "{bad}"
        );
    }

    #[test]
    fn each_transport_mistake_and_every_unset_variable_is_reported() {
        let text = "{\"mcpServers\": {\n  \"ws\": {\"type\": \"websocket\", \"url\": \"ws://h\"},\n  \"both\": {\"command\": \"x\", \"url\": \"http://h\"},\n  \"ftp\": {\"type\": \"streamableHttp\", \"url\": \"ftp://h\"},\n  \"vars\": {\"command\": \"x\", \"args\": [\"${ONE}\"], \"env\": {\"K\": \"${TWO}\"}},\n  \"slow\": {\"command\": \"x\",\n    \"timeout_seconds\": 7200}\n}}";
        let errors = parse(text, "m.json", &env).unwrap_err().0;
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        let has = |needle: &str| lines.iter().any(|l| l.contains(needle));
        assert!(
            has("m.json:2: server `ws`: unknown type \"websocket\""),
            "{lines:#?}"
        );
        assert!(
            has("m.json:3: server `both`: has both `command` and `url`"),
            "{lines:#?}"
        );
        assert!(
            has("m.json:4: server `ftp`: `url` must start with http://"),
            "{lines:#?}"
        );
        assert!(
            has("m.json:5: server `vars`: an argument uses ${ONE}"),
            "{lines:#?}"
        );
        assert!(
            has("m.json:5: server `vars`: env `K` uses ${TWO}"),
            "{lines:#?}"
        );
        assert!(
            has("m.json:7: server `slow`: timeout_seconds = 7200"),
            "{lines:#?}"
        );
        assert_eq!(errors.len(), 6, "{lines:#?}");
    }
}
