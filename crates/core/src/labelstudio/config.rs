//! Label Studio labeling configs: which text a task shows and which answers a labeler gives.
//!
//! A config is an XML document rooted at `<View>`. Object tags (`Text`, `HyperText`, `Header`)
//! show task data, usually through `value="$field"`; control tags (`Choices`, `TextArea`,
//! `Rating`, `Number`, `Labels`) name what a labeler, or batchlab's model, answers. Layout tags
//! (`View`, `Style`, `Filter`, ...) are walked through. Controls batchlab cannot predict (image
//! regions, taxonomies, per-region classifications, ...) are listed as [`UnsupportedTag`]s
//! instead of failing the parse, so a project can still be served for the controls that work.

use std::collections::HashSet;

use roxmltree::Node;
use serde::Serialize;

/// A parsed labeling config: the objects and controls batchlab understands, plus what it skipped.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LabelConfig {
    /// `Text`, `HyperText` and `Header` tags, in document order.
    pub objects: Vec<ObjectTag>,
    /// Controls batchlab can predict and validate, in document order.
    pub controls: Vec<ControlTag>,
    /// Control tags batchlab cannot predict, in document order.
    pub unsupported: Vec<UnsupportedTag>,
}

/// An object tag: something the task shows, usually a field of the task's `data`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ObjectTag {
    /// The tag's `name` (what controls' `toName` refer to); "" for an unnamed `Header`.
    pub name: String,
    /// Which object tag it is.
    pub kind: ObjectKind,
    /// The raw `value` attribute, e.g. `$text` or a literal header title.
    pub value: String,
    /// The data key for `value="$key"`; `None` when the value is a literal.
    pub variable: Option<String>,
}

/// The object tags batchlab reads text from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ObjectKind {
    /// `<Text>`: plain text, the target of span `Labels`.
    Text,
    /// `<HyperText>`: HTML shown as a page.
    HyperText,
    /// `<Header>`: a heading, literal or from data; may be unnamed.
    Header,
}

/// A control tag batchlab can predict: one question a labeler answers.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ControlTag {
    /// The tag's `name`; regions carry it as `from_name`.
    pub name: String,
    /// The object names from `toName`, split on ','.
    pub to_name: Vec<String>,
    /// What kind of answer it takes.
    pub kind: ControlKind,
    /// `required="true"` on a control that is always shown (no `visibleWhen` on it or around it),
    /// so every annotation must answer it.
    pub required: bool,
    /// What the control asks, for prompts: the `Header` right before it, its `hint` and its
    /// `placeholder`, those present joined with " — ".
    pub description: Option<String>,
}

/// The kind of answer a [`ControlTag`] takes, with what the config allows.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ControlKind {
    /// `<Choices>`: pick from fixed options.
    Choices {
        /// Each `Choice`'s `value` (what LS stores), in document order.
        options: Vec<String>,
        /// `choice="multiple"`: several options may be picked.
        multiple: bool,
    },
    /// `<TextArea>`: free text.
    TextArea,
    /// `<Rating>`: 1 to `max` stars.
    Rating {
        /// `maxRating`, default 5.
        max: u32,
    },
    /// `<Number>`: a number, optionally bounded.
    Number {
        /// `min`, if given.
        min: Option<f64>,
        /// `max`, if given.
        max: Option<f64>,
    },
    /// `<Labels>` on a `<Text>`: labelled character spans.
    Labels {
        /// Each `Label`'s `value`, in document order.
        labels: Vec<String>,
    },
}

/// A control tag batchlab cannot predict, kept so errors and UIs can name it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UnsupportedTag {
    /// The tag name as written, e.g. `RectangleLabels`.
    pub tag: String,
    /// Its `name` attribute, if any.
    pub name: Option<String>,
}

/// Why a labeling config cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LabelConfigError {
    /// The text is not well-formed XML.
    #[error("labeling config is not well-formed XML: {0}")]
    Xml(String),
    /// The root element is not `<View>`.
    #[error("labeling config has no <View> root element")]
    NoView,
    /// Two tags share a `name`.
    #[error("labeling config uses the name {0:?} for more than one tag")]
    DuplicateName(String),
    /// A control's `toName` names no object tag.
    #[error("control {control:?} points at {to_name:?}, which is no object tag of the config")]
    UnknownTarget {
        /// The control's name.
        control: String,
        /// The missing object name.
        to_name: String,
    },
    /// A tag lacks an attribute it needs.
    #[error("<{tag}> has no {attribute} attribute")]
    MissingAttribute {
        /// The tag (with its name when it has one).
        tag: String,
        /// The attribute it needs.
        attribute: String,
    },
    /// An attribute's value cannot be read.
    #[error("<{tag}> has an invalid {attribute}: {value:?}")]
    InvalidAttribute {
        /// The tag (with its name when it has one).
        tag: String,
        /// The attribute.
        attribute: String,
        /// Its value as written.
        value: String,
    },
    /// A `Choices` or `Labels` control lists no options.
    #[error("control {0:?} has no options to choose from")]
    NoOptions(String),
    /// Tags are nested deeper than [`MAX_DEPTH`]: Label Studio's own configs are a few levels
    /// deep, and an unbounded walk could exhaust the stack.
    #[error("labeling config nests tags deeper than {limit} levels")]
    TooDeep {
        /// The limit, [`MAX_DEPTH`].
        limit: usize,
    },
    /// A control lists more options than [`MAX_OPTIONS`].
    #[error("control {control:?} lists more than {limit} options")]
    TooManyOptions {
        /// The control's name.
        control: String,
        /// The limit, [`MAX_OPTIONS`].
        limit: usize,
    },
    /// No control in the config is one batchlab can predict.
    #[error("{}", nothing_to_predict(unsupported))]
    NothingToPredict {
        /// Tag names of the controls that are there but unsupported.
        unsupported: Vec<String>,
    },
}

impl LabelConfigError {
    /// Whether the config was refused for its size (nesting, options) rather than its meaning:
    /// services answer these with 400, naming the limit.
    pub fn is_limit(&self) -> bool {
        matches!(self, Self::TooDeep { .. } | Self::TooManyOptions { .. })
    }
}

/// Deepest nesting of tags accepted. Label Studio's own templates nest a few levels; 64 leaves
/// room for any layout a person writes while keeping the walk's stack small.
pub const MAX_DEPTH: usize = 64;

/// Most options (`<Choice>`, `<Label>`) one control may list. Validation and prompts stay
/// cheap; the ML backend applies its own, smaller limit before scoring options.
pub const MAX_OPTIONS: usize = 10_000;

fn nothing_to_predict(unsupported: &[String]) -> String {
    if unsupported.is_empty() {
        "labeling config has no control tag batchlab can predict (Choices, TextArea, Rating, Number, Labels)".into()
    } else {
        format!(
            "labeling config has no control tag batchlab can predict; unsupported: {}",
            unsupported.join(", ")
        )
    }
}

/// Object tags batchlab does not read; controls on them are unsupported.
#[rustfmt::skip]
const FOREIGN_OBJECTS: &[&str] = &[
    "image", "audio", "audioplus", "video", "paragraphs", "table", "timeseries", "list", "pdf",
    "chat", "markdown", "multichannel", "ranker",
];

impl LabelConfig {
    /// Parses a labeling config, case-insensitive in tag and attribute names.
    pub fn parse(xml: &str) -> Result<LabelConfig, LabelConfigError> {
        let doc =
            roxmltree::Document::parse(xml).map_err(|e| LabelConfigError::Xml(e.to_string()))?;
        let root = doc.root_element();
        if !root.tag_name().name().eq_ignore_ascii_case("view") {
            return Err(LabelConfigError::NoView);
        }
        let mut walk = Walk::default();
        walk.children(root, attr(root, "visibleWhen").is_some(), 1)?;
        walk.finish()
    }

    /// The predictable control with this name.
    pub fn control(&self, name: &str) -> Option<&ControlTag> {
        self.controls.iter().find(|c| c.name == name)
    }

    /// The object tag with this name.
    pub fn object(&self, name: &str) -> Option<&ObjectTag> {
        self.objects.iter().find(|o| o.name == name)
    }

    /// Data keys referenced through $variables, in document order, without duplicates.
    ///
    /// Only the objects batchlab reads (Text, HyperText, Header) count.
    pub fn data_fields(&self) -> Vec<String> {
        let mut fields: Vec<String> = Vec::new();
        for variable in self.objects.iter().filter_map(|o| o.variable.as_ref()) {
            if !fields.contains(variable) {
                fields.push(variable.clone());
            }
        }
        fields
    }

    /// Error naming unsupported tags when there is no control the backend can predict.
    pub fn require_predictable(&self) -> Result<(), LabelConfigError> {
        if !self.controls.is_empty() {
            return Ok(());
        }
        let mut tags: Vec<String> = Vec::new();
        for tag in &self.unsupported {
            if !tags.contains(&tag.tag) {
                tags.push(tag.tag.clone());
            }
        }
        Err(LabelConfigError::NothingToPredict { unsupported: tags })
    }
}

impl ControlTag {
    /// The closed set a labeler picks from (`Choices` options, `Labels` labels); empty for
    /// controls that take free text or numbers.
    pub fn options(&self) -> &[String] {
        match &self.kind {
            ControlKind::Choices { options, .. } => options,
            ControlKind::Labels { labels } => labels,
            _ => &[],
        }
    }

    /// "choices" | "textarea" | "rating" | "number" | "labels": the region `type`.
    pub fn type_name(&self) -> &'static str {
        match self.kind {
            ControlKind::Choices { .. } => "choices",
            ControlKind::TextArea => "textarea",
            ControlKind::Rating { .. } => "rating",
            ControlKind::Number { .. } => "number",
            ControlKind::Labels { .. } => "labels",
        }
    }
}

/// An attribute by name, matched exactly first and then ignoring ASCII case.
fn attr<'a>(node: Node<'a, '_>, name: &str) -> Option<&'a str> {
    node.attribute(name).or_else(|| {
        node.attributes()
            .find(|a| a.name().eq_ignore_ascii_case(name))
            .map(|a| a.value())
    })
}

/// `attr="true"`, case-insensitively.
fn flag(node: Node<'_, '_>, name: &str) -> bool {
    attr(node, name).is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// A tag for error messages: `<Choices name="x">` reads as `Choices "x"`.
fn describe(node: Node<'_, '_>) -> String {
    let tag = node.tag_name().name();
    match attr(node, "name") {
        Some(name) => format!("{tag} {name:?}"),
        None => tag.to_owned(),
    }
}

/// A control found in the document, before its targets are checked.
struct Found {
    control: ControlTag,
    tag: String,
}

/// State of one walk over the document.
#[derive(Default)]
struct Walk {
    objects: Vec<ObjectTag>,
    /// Names of object tags batchlab does not read.
    foreign: HashSet<String>,
    controls: Vec<Found>,
    unsupported: Vec<UnsupportedTag>,
    names: HashSet<String>,
    /// A literal `Header` value not yet followed by another tag.
    header: Option<String>,
}

impl Walk {
    /// Walks the element children of `node`, which sits `depth` levels below the document.
    fn children(
        &mut self,
        node: Node<'_, '_>,
        conditional: bool,
        depth: usize,
    ) -> Result<(), LabelConfigError> {
        if depth >= MAX_DEPTH && node.children().any(|c| c.is_element()) {
            return Err(LabelConfigError::TooDeep { limit: MAX_DEPTH });
        }
        for child in node.children().filter(Node::is_element) {
            self.element(
                child,
                conditional || attr(child, "visibleWhen").is_some(),
                depth + 1,
            )?;
        }
        Ok(())
    }

    fn claim(&mut self, name: &str) -> Result<(), LabelConfigError> {
        if !name.is_empty() && !self.names.insert(name.to_owned()) {
            return Err(LabelConfigError::DuplicateName(name.to_owned()));
        }
        Ok(())
    }

    fn element(
        &mut self,
        node: Node<'_, '_>,
        conditional: bool,
        depth: usize,
    ) -> Result<(), LabelConfigError> {
        let tag = node.tag_name().name().to_ascii_lowercase();
        let missing = |attribute: &str| LabelConfigError::MissingAttribute {
            tag: describe(node),
            attribute: attribute.to_owned(),
        };
        match tag.as_str() {
            "text" | "hypertext" | "header" => {
                let kind = match tag.as_str() {
                    "text" => ObjectKind::Text,
                    "hypertext" => ObjectKind::HyperText,
                    _ => ObjectKind::Header,
                };
                let name = match (attr(node, "name"), kind) {
                    (Some(name), _) => name.to_owned(),
                    (None, ObjectKind::Header) => String::new(),
                    (None, _) => return Err(missing("name")),
                };
                let value = match (attr(node, "value"), kind) {
                    (Some(value), _) => value.to_owned(),
                    (None, ObjectKind::Header) => node.text().unwrap_or_default().trim().to_owned(),
                    (None, _) => return Err(missing("value")),
                };
                self.claim(&name)?;
                let variable = value
                    .trim()
                    .strip_prefix('$')
                    .filter(|v| !v.is_empty())
                    .map(str::to_owned);
                self.header = match kind {
                    ObjectKind::Header if variable.is_none() && !value.trim().is_empty() => {
                        Some(value.trim().to_owned())
                    }
                    _ => None,
                };
                self.objects.push(ObjectTag {
                    name,
                    kind,
                    value,
                    variable,
                });
            }
            "choices" | "textarea" | "rating" | "number" | "labels" => {
                let header = self.header.take();
                let name = attr(node, "name")
                    .ok_or_else(|| missing("name"))?
                    .to_owned();
                self.claim(&name)?;
                let to_name: Vec<String> = attr(node, "toName")
                    .ok_or_else(|| missing("toName"))?
                    .split(',')
                    .map(|t| t.trim().to_owned())
                    .filter(|t| !t.is_empty())
                    .collect();
                if to_name.is_empty() {
                    return Err(missing("toName"));
                }
                let dynamic = attr(node, "value").is_some_and(|v| v.trim().starts_with('$'));
                if flag(node, "perRegion") || dynamic {
                    self.unsupported.push(UnsupportedTag {
                        tag: node.tag_name().name().to_owned(),
                        name: Some(name),
                    });
                    return Ok(());
                }
                let kind = control_kind(node, &tag)?;
                let description = [
                    header,
                    attr(node, "hint").map(str::to_owned),
                    attr(node, "placeholder").map(str::to_owned),
                ]
                .into_iter()
                .flatten()
                .map(|d| d.trim().to_owned())
                .filter(|d| !d.is_empty())
                .fold(Vec::<String>::new(), |mut parts, d| {
                    if !parts.contains(&d) {
                        parts.push(d);
                    }
                    parts
                });
                let description = (!description.is_empty()).then(|| description.join(" — "));
                let control = ControlTag {
                    name,
                    to_name,
                    kind,
                    required: flag(node, "required") && !conditional,
                    description,
                };
                self.controls.push(Found {
                    control,
                    tag: node.tag_name().name().to_owned(),
                });
            }
            _ if FOREIGN_OBJECTS.contains(&tag.as_str()) => {
                self.header = None;
                if let Some(name) = attr(node, "name") {
                    self.claim(name)?;
                    self.foreign.insert(name.to_owned());
                }
            }
            _ if attr(node, "toName").is_some() => {
                self.header = None;
                let name = attr(node, "name").map(str::to_owned);
                if let Some(name) = &name {
                    self.claim(name)?;
                }
                self.unsupported.push(UnsupportedTag {
                    tag: node.tag_name().name().to_owned(),
                    name,
                });
            }
            _ => self.children(node, conditional, depth)?,
        }
        Ok(())
    }

    /// Checks every control's targets; controls on objects batchlab does not read, and span
    /// labels on anything but `Text`, become unsupported.
    fn finish(self) -> Result<LabelConfig, LabelConfigError> {
        let Walk {
            objects,
            foreign,
            controls: found,
            mut unsupported,
            ..
        } = self;
        let mut controls = Vec::new();
        for Found { control, tag } in found {
            let mut readable = true;
            for target in &control.to_name {
                match objects.iter().find(|o| &o.name == target) {
                    Some(object) => {
                        if matches!(control.kind, ControlKind::Labels { .. })
                            && object.kind != ObjectKind::Text
                        {
                            readable = false;
                        }
                    }
                    None if foreign.contains(target) => readable = false,
                    None => {
                        return Err(LabelConfigError::UnknownTarget {
                            control: control.name.clone(),
                            to_name: target.clone(),
                        })
                    }
                }
            }
            if readable {
                controls.push(control);
            } else {
                unsupported.push(UnsupportedTag {
                    tag,
                    name: Some(control.name),
                });
            }
        }
        Ok(LabelConfig {
            objects,
            controls,
            unsupported,
        })
    }
}

/// Reads the kind-specific part of a supported control (`tag` is lowercased).
fn control_kind(node: Node<'_, '_>, tag: &str) -> Result<ControlKind, LabelConfigError> {
    let invalid = |attribute: &str, value: &str| LabelConfigError::InvalidAttribute {
        tag: describe(node),
        attribute: attribute.to_owned(),
        value: value.to_owned(),
    };
    let name = || attr(node, "name").unwrap_or_default().to_owned();
    let options = |child: &str| -> Result<Vec<String>, LabelConfigError> {
        let options: Vec<String> = node
            .descendants()
            .filter(|d| d.is_element() && d.tag_name().name().eq_ignore_ascii_case(child))
            .filter_map(|d| {
                attr(d, "value")
                    .or_else(|| attr(d, "alias"))
                    .map(str::to_owned)
                    .or_else(|| {
                        d.text()
                            .map(|t| t.trim().to_owned())
                            .filter(|t| !t.is_empty())
                    })
            })
            .take(MAX_OPTIONS + 1)
            .collect();
        if options.len() > MAX_OPTIONS {
            return Err(LabelConfigError::TooManyOptions {
                control: name(),
                limit: MAX_OPTIONS,
            });
        }
        Ok(options)
    };
    Ok(match tag {
        "choices" => {
            let options = options("choice")?;
            if options.is_empty() {
                return Err(LabelConfigError::NoOptions(name()));
            }
            let multiple =
                attr(node, "choice").is_some_and(|c| c.trim().eq_ignore_ascii_case("multiple"));
            ControlKind::Choices { options, multiple }
        }
        "labels" => {
            let labels = options("label")?;
            if labels.is_empty() {
                return Err(LabelConfigError::NoOptions(name()));
            }
            ControlKind::Labels { labels }
        }
        "rating" => {
            let max = match attr(node, "maxRating") {
                None => 5,
                Some(raw) => raw
                    .trim()
                    .parse::<u32>()
                    .ok()
                    .filter(|m| *m >= 1)
                    .ok_or_else(|| invalid("maxRating", raw))?,
            };
            ControlKind::Rating { max }
        }
        "number" => {
            let bound = |attribute: &str| -> Result<Option<f64>, LabelConfigError> {
                match attr(node, attribute) {
                    None => Ok(None),
                    Some(raw) if raw.trim().is_empty() => Ok(None),
                    Some(raw) => raw
                        .trim()
                        .parse::<f64>()
                        .ok()
                        .filter(|b| b.is_finite())
                        .map(Some)
                        .ok_or_else(|| invalid(attribute, raw)),
                }
            };
            ControlKind::Number {
                min: bound("min")?,
                max: bound("max")?,
            }
        }
        _ => ControlKind::TextArea,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config nested 20,000 levels deep once overflowed the walk's stack and aborted the
    /// process (both services parse configs from requests and webhooks).
    #[test]
    fn deeply_nested_configs_are_refused_naming_the_limit() {
        let deep = format!(
            "{}<Text name=\"t\" value=\"$text\"/><Choices name=\"c\" toName=\"t\"><Choice value=\"a\"/></Choices>{}",
            "<View>".repeat(20_000),
            "</View>".repeat(20_000)
        );
        let err = LabelConfig::parse(&deep).unwrap_err();
        assert_eq!(err, LabelConfigError::TooDeep { limit: MAX_DEPTH });
        assert!(err.is_limit());
        assert!(err.to_string().contains("64 levels"), "{err}");

        // Exactly at the limit is fine: the control sits at depth MAX_DEPTH.
        let nest = |levels: usize| {
            format!(
                "{}<Text name=\"t\" value=\"$text\"/><Choices name=\"c\" toName=\"t\"><Choice value=\"a\"/></Choices>{}",
                "<View>".repeat(levels),
                "</View>".repeat(levels)
            )
        };
        assert!(LabelConfig::parse(&nest(MAX_DEPTH - 1)).is_ok());
        assert_eq!(
            LabelConfig::parse(&nest(MAX_DEPTH)).unwrap_err(),
            LabelConfigError::TooDeep { limit: MAX_DEPTH }
        );
    }

    #[test]
    fn controls_with_too_many_options_are_refused() {
        let wide = |n: usize| {
            let choices: String = (0..n)
                .map(|i| format!("<Choice value=\"o{i}\"/>"))
                .collect();
            format!("<View><Text name=\"t\" value=\"$text\"/><Choices name=\"c\" toName=\"t\">{choices}</Choices></View>")
        };
        assert!(LabelConfig::parse(&wide(MAX_OPTIONS)).is_ok());
        let err = LabelConfig::parse(&wide(50_000)).unwrap_err();
        assert_eq!(
            err,
            LabelConfigError::TooManyOptions {
                control: "c".into(),
                limit: MAX_OPTIONS
            }
        );
        assert!(err.is_limit());
    }

    /// Entity declarations (the "billion laughs") are refused: no DTD is processed at all.
    #[test]
    fn entity_declarations_are_refused() {
        let xml = r#"<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]><View><Text name="t" value="&lol2;"/></View>"#;
        assert!(matches!(
            LabelConfig::parse(xml),
            Err(LabelConfigError::Xml(_))
        ));
    }
}
