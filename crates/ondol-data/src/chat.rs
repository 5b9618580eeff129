//! Conversations rendered by a model's chat template, as transformers' `apply_chat_template`
//! renders them, with the spans of the assistant's turns, which fine-tuning learns.
//!
//! The template is a `.jinja` file (transformers' own `chat_template.jinja`, which it prefers
//! where a directory has one) or the Jinja of a `tokenizer_config.json` (`chat_template`, a
//! string or a list of named templates of which `default` is used); the special tokens come
//! from the tokenizer_config.json beside the tokenizer either way. It renders as
//! transformers renders it: blocks trimmed (`trim_blocks`, `lstrip_blocks`), loop controls,
//! Python's string and dict methods (`strip`, `startswith`, `items`, ...), `raise_exception`,
//! `tojson` as Python's `json.dumps` writes (no ASCII or HTML escaping), and the
//! tokenizer's special tokens (`bos_token`, `eos_token`, ...) as variables. `strftime_now` is
//! left undefined, so templates that date their system prompt (Llama 3.2's) fall back to
//! their fixed date and the prepared data does not depend on the day.
//!
//! transformers' own tag pair `{% generation %}`..`{% endgeneration %}` (which some templates
//! put around the assistant's turns) renders its contents as they are; the spans below do the
//! tags' work.
//!
//! An assistant message's span runs from the end of the conversation before it, rendered with
//! the generation prompt (`add_generation_prompt`: the assistant's header), to the end of the
//! conversation through it: its content and whatever the template closes the turn with (the
//! end-of-turn token, which the model must learn to stop). Where both renderings start the
//! whole conversation's, it is one document with all its turns learned. A template that
//! renders earlier turns otherwise once later ones follow (Qwen3's drops the reasoning of
//! earlier turns, and marks the last turn's) makes one document per assistant turn instead:
//! the conversation through that turn, only that turn learned, as the model read it when it
//! replied.

use std::ops::Range;
use std::path::Path;

use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::Value as Json;

use crate::DataError;

/// A loaded chat template and the variables it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The tokenizer's special tokens by name (`bos_token`, `eos_token`, ...).
    special_tokens: serde_json::Map<String, Json>,
    /// The template's Jinja, as given.
    source: String,
}

/// transformers' file for a chat template of its own.
pub const TEMPLATE_FILE: &str = "chat_template.jinja";
const TOKENIZER_CONFIG: &str = "tokenizer_config.json";

/// A rendered conversation: its text, and the byte ranges of the assistant's turns.
#[derive(Debug, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    pub learned: Vec<Range<usize>>,
}

impl ChatTemplate {
    /// The template file of the tokenizer or model in `dir`, as transformers picks it:
    /// chat_template.jinja where there is one, else tokenizer_config.json.
    pub fn file_in(dir: &Path) -> std::path::PathBuf {
        let own = dir.join(TEMPLATE_FILE);
        if own.is_file() { own } else { dir.join(TOKENIZER_CONFIG) }
    }

    /// The template of `path` (a tokenizer_config.json, by its extension, or any other file as
    /// the template itself), with the special tokens of the tokenizer_config.json in
    /// `tokenizer_dir` where it has one.
    pub fn load(path: &Path, tokenizer_dir: &Path) -> Result<Self, DataError> {
        let read_json = |path: &Path| -> Result<Json, DataError> {
            let text = std::fs::read_to_string(path).map_err(|e| DataError::io("read", path, e))?;
            serde_json::from_str(&text).map_err(|e| DataError::format(path, e.to_string()))
        };
        let config = path.extension().is_some_and(|e| e == "json").then(|| read_json(path)).transpose()?;
        // The tokenizer's own config, unless that is the template's file, read already.
        let specials = tokenizer_dir.join(TOKENIZER_CONFIG);
        let same = config.is_some() && std::fs::canonicalize(path).ok() == std::fs::canonicalize(&specials).ok();
        let mut special_tokens = match specials.is_file() && !same {
            true => special_tokens_of(&read_json(&specials)?),
            false => serde_json::Map::new(),
        };
        let source = match &config {
            Some(config) => {
                special_tokens.extend(special_tokens_of(config));
                template_of_config(config).map_err(|what| DataError::format(path, what))?
            }
            None => std::fs::read_to_string(path).map_err(|e| DataError::io("read chat template", path, e))?,
        };
        Self::new(source, special_tokens).map_err(|e| DataError::format(path, e))
    }

    /// The template's Jinja.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The template `source`, rendered with `special_tokens` as variables.
    pub fn new(source: String, special_tokens: serde_json::Map<String, Json>) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_filter("tojson", python_tojson);
        let jinja = without_generation_tags(&source);
        env.add_template_owned("chat", jinja).map_err(|e| format!("the chat template does not parse: {e:#}"))?;
        Ok(Self { env, special_tokens, source })
    }

    /// `messages` (a conversation: objects with a `role`) as the template renders them, with
    /// the spans of the assistant's messages: one document, or one per assistant turn where
    /// the template rewrites earlier turns (see the module docs).
    pub fn render(&self, messages: &[Json]) -> Result<Vec<Rendered>, String> {
        let text = self.render_start(messages, false)?;
        let mut turns = Vec::new();
        for i in (0..messages.len()).filter(|&i| messages[i]["role"] == "assistant") {
            let before = self.render_start(&messages[..i], true)?;
            let through = self.render_start(&messages[..=i], false)?;
            if !through.starts_with(&before) {
                return Err(format!(
                    "the chat template renders message {i} (the assistant's) without the generation prompt before \
                     it, so the turn's tokens cannot be told apart"
                ));
            }
            turns.push((before.len()..through.len(), through));
        }
        if turns.is_empty() {
            return Err("the conversation has no assistant message: nothing in it would be learned".into());
        }
        if turns.iter().all(|(_, through)| text.starts_with(through.as_str())) {
            return Ok(vec![Rendered { text, learned: turns.into_iter().map(|(span, _)| span).collect() }]);
        }
        Ok(turns.into_iter().map(|(span, through)| Rendered { text: through, learned: vec![span] }).collect())
    }

    /// `messages` followed by the assistant's header (`add_generation_prompt`): the prompt a
    /// chat model replies to.
    pub fn prompt(&self, messages: &[Json]) -> Result<String, String> {
        self.render_start(messages, true)
    }

    /// The text of the tokenizer's special token `name` (`eos_token`, ...), where its config
    /// gives one.
    pub fn special_token(&self, name: &str) -> Option<&str> {
        self.special_tokens.get(name).and_then(Json::as_str)
    }

    /// What the template writes after an assistant's message to close the turn (a chat
    /// model's end-of-turn, `<|im_end|>\n`, `<end_of_turn>\n`), found by rendering a probe
    /// conversation; None where it writes nothing after it or fails on the probe.
    pub fn turn_end(&self) -> Option<String> {
        const PROBE: &str = "\u{E001}"; // a private-use character no template trims or writes
        let messages = [
            serde_json::json!({"role": "user", "content": "\u{E000}"}),
            serde_json::json!({"role": "assistant", "content": PROBE}),
        ];
        let text = self.render_start(&messages, false).ok()?;
        let after = &text[text.rfind(PROBE)? + PROBE.len()..];
        (!after.is_empty()).then(|| after.to_owned())
    }

    fn render_start(&self, messages: &[Json], add_generation_prompt: bool) -> Result<String, String> {
        let mut context = self.special_tokens.clone();
        context.insert("messages".into(), Json::Array(messages.to_vec()));
        context.insert("add_generation_prompt".into(), Json::Bool(add_generation_prompt));
        let template = self.env.get_template("chat").expect("added in new");
        template.render(Value::from_serialize(&context)).map_err(|e| format!("the chat template failed: {e:#}"))
    }
}

/// `source` with transformers' `{% generation %}` and `{% endgeneration %}` tags as a block
/// that always renders (`{% if true %}`, `{% endif %}`), whitespace control kept. (A `%}`
/// inside a string of a tag is not looked for: no tag that matters here has one.)
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(open) = rest.find("{%") {
        let Some(len) = rest[open..].find("%}") else { break };
        let tag = &rest[open + 2..open + len];
        // Whitespace control (`-` trims, `+` keeps) at either end stays with the tag.
        let control = |c: Option<char>| c.filter(|c| matches!(c, '-' | '+')).map(String::from).unwrap_or_default();
        let (left, right) = (control(tag.chars().next()), control(tag.chars().last()));
        let name = tag.trim_start_matches(['-', '+']).trim_end_matches(['-', '+']).trim();
        out.push_str(&rest[..open]);
        match name {
            "generation" | "endgeneration" => {
                let body = if name == "generation" { " if true " } else { " endif " };
                out.push_str(&format!("{{%{left}{body}{right}%}}"));
            }
            _ => out.push_str(&rest[open..open + len + 2]),
        }
        rest = &rest[open + len + 2..];
    }
    out.push_str(rest);
    out
}

/// The template of a tokenizer_config.json: `chat_template` as a string, or the one named
/// `default` in a list of `{name, template}`.
fn template_of_config(config: &Json) -> Result<String, String> {
    match &config["chat_template"] {
        Json::String(s) => Ok(s.clone()),
        Json::Array(named) => named
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(str::to_owned)
            .ok_or_else(|| "chat_template lists named templates, none of them `default`".into()),
        Json::Null => Err("it has no chat_template".into()),
        other => Err(format!("chat_template is neither a string nor a list of named templates: {other}")),
    }
}

/// The special tokens of a tokenizer_config.json by name, as transformers passes them to
/// templates: each `*_token` field's text (written either as a string or as an added token's
/// `{"content": ...}`).
fn special_tokens_of(config: &Json) -> serde_json::Map<String, Json> {
    let Some(fields) = config.as_object() else { return serde_json::Map::new() };
    fields
        .iter()
        .filter(|(name, _)| name.ends_with("_token"))
        .filter_map(|(name, v)| {
            let text = v.as_str().or_else(|| v["content"].as_str())?;
            Some((name.clone(), Json::String(text.to_owned())))
        })
        .collect()
}

/// Jinja's `tojson` as transformers defines it: Python's `json.dumps(x, ensure_ascii=False,
/// indent=indent)`, whose separators are ", " and ": " (",", ": " with an indent). Objects'
/// keys come in sorted order (the JSON Lines reader keeps no other; Python keeps the input's).
fn python_tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json: Json =
        serde_json::to_value(&value).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_python_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_python_json(v: &Json, indent: Option<usize>, depth: usize, out: &mut String) {
    let (open, close, items): (char, char, Vec<(Option<&str>, &Json)>) = match v {
        Json::Array(a) => ('[', ']', a.iter().map(|x| (None, x)).collect()),
        Json::Object(o) => ('{', '}', o.iter().map(|(k, x)| (Some(k.as_str()), x)).collect()),
        scalar => {
            out.push_str(&scalar.to_string());
            return;
        }
    };
    out.push(open);
    for (i, (key, item)) in items.iter().enumerate() {
        match indent {
            Some(n) => {
                out.push_str(if i == 0 { "\n" } else { ",\n" });
                out.push_str(&" ".repeat(n * (depth + 1)));
            }
            None if i > 0 => out.push_str(", "),
            None => {}
        }
        if let Some(key) = key {
            out.push_str(&Json::String((*key).to_owned()).to_string());
            out.push_str(": ");
        }
        write_python_json(item, indent, depth + 1, out);
    }
    if let (Some(n), false) = (indent, items.is_empty()) {
        out.push('\n');
        out.push_str(&" ".repeat(n * depth));
    }
    out.push(close);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A ChatML template (Qwen2.5's layout) with a default system prompt.
    const CHATML: &str = "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\nBe brief.<|im_end|>\n' }}\
        {%- endif %}{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\n' + \
        message['content'] | trim + '<|im_end|>\n' }}{%- endfor %}\
        {%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}";

    fn chatml() -> ChatTemplate {
        ChatTemplate::new(CHATML.into(), serde_json::Map::new()).unwrap()
    }

    #[test]
    fn assistant_turns_are_spans_that_close_with_the_end_of_turn() {
        let messages = [
            json!({"role": "user", "content": "Hi "}),
            json!({"role": "assistant", "content": "Hello."}),
            json!({"role": "user", "content": "온돌?"}),
            json!({"role": "assistant", "content": "A floor heater."}),
        ];
        let [r] = &chatml().render(&messages).unwrap()[..] else { panic!("one document") };
        let spans: Vec<&str> = r.learned.iter().map(|s| &r.text[s.clone()]).collect();
        assert_eq!(spans, ["Hello.<|im_end|>\n", "A floor heater.<|im_end|>\n"]);
        assert!(r.text.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"));
        let err = chatml().render(&messages[..1]).unwrap_err();
        assert!(err.contains("no assistant message"), "{err}");
    }

    #[test]
    fn the_end_of_turn_is_what_closes_an_assistant_message() {
        assert_eq!(chatml().turn_end().as_deref(), Some("<|im_end|>\n"));
        let bare = ChatTemplate::new("{% for m in messages %}{{ m.content }}{% endfor %}".into(), Default::default());
        assert_eq!(bare.unwrap().turn_end(), None);
    }

    /// A template file of its own takes the special tokens of the tokenizer_config.json beside
    /// the tokenizer, and is the one a directory offers before tokenizer_config.json's.
    #[test]
    fn a_jinja_file_gets_the_tokenizers_special_tokens_and_comes_first() {
        let dir = tempfile::tempdir().unwrap();
        let config = json!({"bos_token": "<s>", "chat_template": "config's"});
        std::fs::write(dir.path().join(TOKENIZER_CONFIG), config.to_string()).unwrap();
        assert_eq!(ChatTemplate::file_in(dir.path()), dir.path().join(TOKENIZER_CONFIG));
        let from_config = ChatTemplate::load(&ChatTemplate::file_in(dir.path()), dir.path()).unwrap();
        assert_eq!(from_config.source(), "config's");
        std::fs::write(dir.path().join(TEMPLATE_FILE), "{{ bos_token }}{{ messages[0].content }}").unwrap();
        let file = ChatTemplate::file_in(dir.path());
        assert_eq!(file, dir.path().join(TEMPLATE_FILE));
        let t = ChatTemplate::load(&file, dir.path()).unwrap();
        assert_eq!(t.prompt(&[json!({"role": "user", "content": "hi"})]).unwrap(), "<s>hi");
    }

    #[test]
    fn a_template_that_rewrites_earlier_turns_makes_a_document_per_turn() {
        // The last assistant turn gets a marker the earlier ones lose (as Qwen3's think blocks).
        let source = "{%- for m in messages %}{{ m['role'] }}: {% if loop.last and m['role'] == 'assistant' %}\
            [last] {% endif %}{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}";
        let t = ChatTemplate::new(source.into(), serde_json::Map::new()).unwrap();
        let one = [json!({"role": "user", "content": "a"}), json!({"role": "assistant", "content": "b"})];
        let [r] = &t.render(&one).unwrap()[..] else { panic!("one document") };
        assert_eq!((r.text.as_str(), &r.text[r.learned[0].clone()]), ("user: a\nassistant: [last] b\n", "[last] b\n"));
        let two = [
            one[0].clone(),
            one[1].clone(),
            json!({"role": "user", "content": "c"}),
            json!({"role": "assistant", "content": "d"}),
        ];
        let docs = t.render(&two).unwrap();
        let learned: Vec<(&str, &str)> =
            docs.iter().map(|r| (r.text.as_str(), &r.text[r.learned[0].clone()])).collect();
        assert_eq!(
            learned,
            [
                ("user: a\nassistant: [last] b\n", "[last] b\n"),
                ("user: a\nassistant: b\nuser: c\nassistant: [last] d\n", "[last] d\n")
            ]
        );
        assert!(docs.iter().all(|r| r.learned.len() == 1));
    }

    #[test]
    fn templates_see_special_tokens_python_methods_raise_exception_and_python_json() {
        let config = json!({
            "bos_token": {"content": "<s>", "lstrip": false},
            "eos_token": "</s>",
            "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template":
                "{{ bos_token }}{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}\
                 {{ raise_exception('roles must be user or assistant') }}{% endif %}\
                 {{ m.content.strip().upper() }}{% if m.meta is defined %}{{ m.meta | tojson }}{% endif %}\
                 {{ eos_token if m.role == 'assistant' }}{% endfor %}"}]
        });
        let t = ChatTemplate::new(template_of_config(&config).unwrap(), special_tokens_of(&config)).unwrap();
        let messages = [
            json!({"role": "user", "content": " q ", "meta": {"a": null, "b": [1, "é<"]}}),
            json!({"role": "assistant", "content": "a"}),
        ];
        let r = &t.render(&messages).unwrap()[0];
        assert_eq!(r.text, "<s>Q{\"a\": null, \"b\": [1, \"é<\"]}A</s>");
        assert_eq!(&r.text[r.learned[0].clone()], "A</s>");
        let err = t.render(&[json!({"role": "tool", "content": "x"})]).unwrap_err();
        assert!(err.contains("roles must be user or assistant"), "{err}");
        let tagged = "{% for m in messages %}{%- generation -%} {{ m.content }} {% endgeneration %}{% endfor %}";
        let t = ChatTemplate::new(tagged.into(), serde_json::Map::new()).unwrap();
        assert_eq!(t.render(&messages).unwrap()[0].text, " q  a ", "the tags render their contents, trimming kept");
        let mut pretty = String::new();
        write_python_json(&json!({"e": [], "k": [1, {}]}), Some(2), 0, &mut pretty);
        assert_eq!(pretty, "{\n  \"e\": [],\n  \"k\": [\n    1,\n    {}\n  ]\n}");
    }
}
