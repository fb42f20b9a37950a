//! `img create -f FMT [-b BACKING [-F FMT]] [-o k=v,...] FILE [SIZE]`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Args;

use super::size::parse_size;
use super::{format_arg, open_image, parse_options, refuse_overwriting};
use crate::error::{Error, Result};
use crate::image::{self, CreateBacking, CreateOptions, Format};

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Format of the new image: raw, vhd (or vpc) or qcow2.
    #[arg(short = 'f', value_name = "FMT", value_parser = format_arg, default_value = "raw")]
    pub format: Format,
    /// Backing image (parent); a relative name is relative to FILE's directory.
    #[arg(short = 'b', value_name = "BACKING")]
    pub backing: Option<String>,
    /// Format of the backing image (probed when omitted).
    #[arg(short = 'F', value_name = "FMT", value_parser = format_arg)]
    pub backing_format: Option<Format>,
    /// Format options, key=value[,key=value...] (may be repeated).
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Print nothing on success.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// The image file to create (an existing file is replaced).
    pub file: PathBuf,
    /// Virtual size with an optional suffix (k, M, G, T, P, E); defaults to the backing's.
    pub size: Option<String>,
}

pub fn run(args: &CreateArgs) -> Result<()> {
    let mut options = parse_options(&args.options)?;
    // qemu-img also takes these as -o keys.
    let size_text = args.size.clone().or_else(|| options.remove("size"));
    let backing = args
        .backing
        .clone()
        .or_else(|| options.remove("backing_file"));
    let backing_format = match (args.backing_format, options.remove("backing_fmt")) {
        (Some(f), _) => Some(f),
        (None, Some(name)) => Some(Format::parse(&name)?),
        (None, None) => None,
    };
    let size = size_text.as_deref().map(parse_size).transpose()?;
    let created = create_image(
        &args.file,
        args.format,
        size,
        backing.as_deref().map(|name| (name, backing_format)),
        options,
    )?;
    if !args.quiet {
        let mut line = format!(
            "Formatting '{}', fmt={} size={}",
            args.file.display(),
            args.format,
            created.size
        );
        if let Some(backing) = &created.backing {
            line.push_str(&format!(
                " backing_file={} backing_fmt={}",
                backing.0, backing.1
            ));
        }
        println!("{line}");
    }
    Ok(())
}

/// What `create_image` made.
pub struct Created {
    pub size: u64,
    /// Backing name as recorded, and its format.
    pub backing: Option<(String, Format)>,
}

/// Create `path` as `format`. Without `size`, a backing image gives the size.
pub fn create_image(
    path: &Path,
    format: Format,
    size: Option<u64>,
    backing: Option<(&str, Option<Format>)>,
    options: BTreeMap<String, String>,
) -> Result<Created> {
    let backing = match backing {
        None => None,
        Some((name, backing_format)) => {
            let resolved = resolve_backing_name(path, name);
            let parent = open_image(&resolved, backing_format, true)
                .map_err(|e| Error::invalid(format!("cannot open backing file: {e}")))?;
            refuse_overwriting(path, &parent)?;
            let layer = parent.top().clone();
            Some(CreateBacking {
                name: name.to_string(),
                format: layer.format(),
                layer,
            })
        }
    };
    let size = match (size, &backing) {
        (Some(size), _) => size,
        (None, Some(parent)) => parent.layer.virtual_size(),
        (None, None) => {
            return Err(Error::invalid(
                "image creation needs a size (or a backing file to take it from)",
            ))
        }
    };
    let recorded = backing.as_ref().map(|b| (b.name.clone(), b.format));
    image::create(
        path,
        format,
        CreateOptions {
            size,
            backing,
            options,
        },
    )?;
    Ok(Created {
        size,
        backing: recorded,
    })
}

/// A backing name is stored as given; a relative one is relative to the new image's
/// directory, as every reader of the chain will resolve it.
fn resolve_backing_name(image: &Path, name: &str) -> PathBuf {
    let name = Path::new(name);
    if name.is_absolute() {
        return name.to_path_buf();
    }
    match image.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(name),
        _ => name.to_path_buf(),
    }
}
