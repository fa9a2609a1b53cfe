//! `#[moe_extension]`: Burn's `#[backend_extension]` with the list of backends burn-moe
//! serves written once.
//!
//! Every operation of `moe-kernels` is a backend extension trait that Burn's attribute turns
//! into dispatch over the backends it names. The list is the same for every operation (the
//! autodiff wrapper, then ndarray, Burn's remote backend, flex and the CubeCL backend, each
//! behind the feature of `moe-kernels` that enables it), so it lives here: adding a backend is
//! one edit, and no operation can forget one. An attribute (not a `macro_rules!` around the
//! trait) keeps the trait's body formatted by rustfmt.

use proc_macro::TokenStream;

/// The backends every operation dispatches to, as `#[backend_extension]` takes them; the
/// `cfg` conditions name `moe-kernels`' features.
const BACKENDS: &str = r#"Autodiff,
    NdArray: cfg(feature = "ndarray"),
    Remote: cfg(feature = "remote"),
    Flex: cfg(feature = "flex"),
    Cube: cfg(feature = "wgpu")"#;

/// Burn's `#[backend_extension]` over burn-moe's backends. `#[moe_extension(fusion)]` also
/// names Burn's fusion wrapper of the CubeCL backend, for operations whose CubeCL kernel takes
/// part in fusion (their fusion implementation is written by hand).
#[proc_macro_attribute]
pub fn moe_extension(attr: TokenStream, item: TokenStream) -> TokenStream {
    let fusion = match attr.to_string().trim() {
        "" => "",
        "fusion" => ",\n    Fusion: cfg(feature = \"wgpu\")",
        other => {
            let message = format!("`#[moe_extension({other})]`: the only option is `fusion`");
            return format!("compile_error!({message:?});")
                .parse()
                .expect("a compile_error call parses");
        }
    };
    let attribute: TokenStream = format!("#[burn::backend::backend_extension({BACKENDS}{fusion})]")
        .parse()
        .expect("the attribute parses");
    attribute.into_iter().chain(item).collect()
}
