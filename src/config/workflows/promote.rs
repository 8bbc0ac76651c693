//! `hypertool experiments promote`: a workflow file edited in place to keep one variant of a
//! stage, every other line (comments included) as it was.

/// Promotes `variant` of `stage` of `workflow` in the configuration at `source`: its workflow
/// file rewritten by [`promote_variant`], checked with the whole configuration, then put in place
/// (written beside it and renamed). The file's path, or what stopped it (nothing is written).
pub fn promote_in_place(
    source: &crate::config::Source,
    workflow: &str,
    stage: &str,
    variant: &str,
) -> Result<std::path::PathBuf, String> {
    let cfg = crate::config::load(source).map_err(|errors| errors.to_string())?;
    let Some(w) = cfg.workflows.get(workflow) else {
        let known: Vec<&str> = cfg.workflows.workflows.keys().map(String::as_str).collect();
        return Err(format!(
            "error: no workflow `{workflow}` in {}; workflows: {}",
            source.describe(),
            known.join(", ")
        ));
    };
    let file = std::path::PathBuf::from(&w.file);
    if !file.is_file() {
        return Err(format!(
            "error: workflow `{workflow}` is built in ({}); copy the configuration to a directory and pass --config",
            w.file
        ));
    }
    let text = std::fs::read_to_string(&file)
        .map_err(|e| format!("error: cannot read {}: {e}", file.display()))?;
    let promoted = promote_variant(&text, stage, variant)
        .map_err(|why| format!("error: {}: {why}", file.display()))?;
    if let Err(errors) = crate::config::load_with_workflow(source, &file, &promoted) {
        return Err(format!(
            "{errors}\nerror: the promoted {} would not load; it was not written",
            file.display()
        ));
    }
    let staged = file.with_extension("yml.promoting");
    std::fs::write(&staged, &promoted)
        .map_err(|e| format!("error: cannot write {}: {e}", staged.display()))?;
    std::fs::rename(&staged, &file)
        .map_err(|e| format!("error: cannot replace {}: {e}", file.display()))?;
    Ok(file)
}

/// The workflow file `text` with `stage` left on `variant` alone: its other variants and its
/// `allocation` removed, every other line (comments included) as it was. `Err` names what is
/// missing. The result is checked by the caller (`config::load_with_workflow`) before it is written.
pub fn promote_variant(text: &str, stage: &str, variant: &str) -> Result<String, String> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let quiet = |l: &str| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#')
    };
    // `- name: x` or `name: x` (with or without quotes, a comment after it) names `x`.
    let names = |l: &str, name: &str| {
        let t = l.trim_start();
        let t = t.strip_prefix("- ").map(str::trim_start).unwrap_or(t);
        t.strip_prefix("name:").is_some_and(|v| {
            let v = v.split(" #").next().unwrap_or("").trim();
            v.trim_matches(|c| c == '"' || c == '\'') == name
        })
    };
    let stages_at = lines
        .iter()
        .position(|l| l.trim_start().starts_with("stages:") && indent(l) == 0)
        .ok_or("the file has no `stages:`")?;
    let item_indent = lines[stages_at + 1..]
        .iter()
        .find(|l| !quiet(l))
        .map(|l| indent(l))
        .ok_or("`stages:` lists no stages")?;
    let stage_at = (stages_at + 1..lines.len())
        .find(|&i| {
            indent(lines[i]) == item_indent
                && lines[i].trim_start().starts_with("- ")
                && names(lines[i], stage)
        })
        .ok_or_else(|| format!("the workflow has no stage `{stage}`"))?;
    let key_indent = item_indent + 2;
    let stage_end = (stage_at + 1..lines.len())
        .find(|&i| !quiet(lines[i]) && indent(lines[i]) <= item_indent)
        .unwrap_or(lines.len());
    // A key of the stage, and where its value (nested lines) ends.
    let key_block = |key: &str| -> Option<(usize, usize)> {
        let at = (stage_at + 1..stage_end)
            .find(|&i| indent(lines[i]) == key_indent && lines[i].trim_start().starts_with(key))?;
        let end = (at + 1..stage_end)
            .find(|&i| {
                !quiet(lines[i])
                    && (indent(lines[i]) < key_indent
                        || (indent(lines[i]) == key_indent
                            && !lines[i].trim_start().starts_with("- ")))
            })
            .unwrap_or(stage_end);
        Some((at, end))
    };
    let (variants_at, variants_end) =
        key_block("variants:").ok_or_else(|| format!("stage `{stage}` has no variants"))?;
    let first_item = (variants_at + 1..variants_end)
        .find(|&i| lines[i].trim_start().starts_with("- "))
        .ok_or_else(|| format!("stage `{stage}` lists no variants"))?;
    let variant_indent = indent(lines[first_item]);
    let starts: Vec<usize> = (first_item..variants_end)
        .filter(|&i| indent(lines[i]) == variant_indent && lines[i].trim_start().starts_with("- "))
        .collect();
    let chosen = starts
        .iter()
        .enumerate()
        .find_map(|(n, &start)| {
            let end = starts.get(n + 1).copied().unwrap_or(variants_end);
            (start..end)
                .any(|i| names(lines[i], variant))
                .then_some((start, end))
        })
        .ok_or_else(|| format!("stage `{stage}` has no variant `{variant}`"))?;
    // The comments just above an item are its own; those ending the item before it are not.
    let mut chosen = chosen;
    while chosen.0 > first_item && quiet(lines[chosen.0 - 1]) {
        chosen.0 -= 1;
    }
    while chosen.1 > chosen.0 + 1 && quiet(lines[chosen.1 - 1]) {
        chosen.1 -= 1;
    }
    let allocation = key_block("allocation:");
    let mut out: Vec<&str> = Vec::with_capacity(lines.len());
    for (i, l) in lines.iter().enumerate() {
        let in_variants = i > variants_at && i < variants_end;
        let kept_variant = i >= chosen.0 && i < chosen.1;
        let in_allocation = allocation.is_some_and(|(a, e)| i >= a && i < e);
        // Comments and blank lines between the variants' items go with them.
        if (in_variants && !kept_variant && i >= first_item) || in_allocation {
            continue;
        }
        out.push(l);
    }
    let mut joined = out.join("\n");
    if text.ends_with('\n') {
        joined.push('\n');
    }
    Ok(joined)
}

#[cfg(test)]
mod tests {
    use super::promote_variant;

    const FILE: &str = "# The implementation experiment.
name: exp
stages:
  - name: design          # first
    model: fast
  - name: implement
    persona: backend-engineer
    # which model and prompt work best?
    variants:
      - name: lo
        model: fast
        prompt: prompts/a.md
      # the challenger
      - name: hi
        model: quality
        temperature: 0.2
    allocation:
      lo: 1
      hi: 3
    quality_gate:
      code_block: python
  - name: review
    model: fast
";

    #[test]
    fn promotion_keeps_one_variant_and_every_other_line() {
        let out = promote_variant(FILE, "implement", "hi").unwrap();
        assert_eq!(
            out,
            "# The implementation experiment.
name: exp
stages:
  - name: design          # first
    model: fast
  - name: implement
    persona: backend-engineer
    # which model and prompt work best?
    variants:
      # the challenger
      - name: hi
        model: quality
        temperature: 0.2
    quality_gate:
      code_block: python
  - name: review
    model: fast
"
        );
        let out = promote_variant(FILE, "implement", "lo").unwrap();
        assert!(out.contains("      - name: lo\n        model: fast\n        prompt: prompts/a.md\n    quality_gate:"), "{out}");
        assert!(
            !out.contains("allocation") && !out.contains("challenger"),
            "{out}"
        );
    }

    #[test]
    fn promotion_names_what_is_missing() {
        assert_eq!(
            promote_variant(FILE, "nope", "hi").unwrap_err(),
            "the workflow has no stage `nope`"
        );
        assert_eq!(
            promote_variant(FILE, "design", "hi").unwrap_err(),
            "stage `design` has no variants"
        );
        assert_eq!(
            promote_variant(FILE, "implement", "mid").unwrap_err(),
            "stage `implement` has no variant `mid`"
        );
    }
}
