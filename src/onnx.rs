//! Building an ONNX model: the protocol buffers of `onnx.proto` that an inference graph needs
//! (encoded with prost), a graph builder, and burn's modules (convolution, BatchNorm, pooling,
//! linear) as ONNX nodes. `runner export` writes what the backbones and heads build here.

use burn::nn::conv::Conv2d;
use burn::nn::pool::MaxPool2d;
use burn::nn::{BatchNorm, Linear, PaddingConfig2d};
use burn::prelude::*;
use prost::Message;

/// The opset the graphs use (every operator here is unchanged since).
pub const OPSET: i64 = 13;

/// `onnx.ModelProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelProto {
    #[prost(int64, tag = "1")]
    ir_version: i64,
    #[prost(string, tag = "2")]
    producer_name: String,
    #[prost(string, tag = "3")]
    producer_version: String,
    #[prost(string, tag = "6")]
    doc_string: String,
    #[prost(message, optional, tag = "7")]
    graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "8")]
    opset_import: Vec<OperatorSetId>,
    #[prost(message, repeated, tag = "14")]
    metadata_props: Vec<StringPair>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct OperatorSetId {
    #[prost(string, tag = "1")]
    domain: String,
    #[prost(int64, tag = "2")]
    version: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StringPair {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(string, tag = "2")]
    value: String,
}

/// `onnx.GraphProto`.
#[derive(Clone, PartialEq, prost::Message)]
struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    node: Vec<NodeProto>,
    #[prost(string, tag = "2")]
    name: String,
    #[prost(message, repeated, tag = "5")]
    initializer: Vec<TensorProto>,
    #[prost(message, repeated, tag = "11")]
    input: Vec<ValueInfo>,
    #[prost(message, repeated, tag = "12")]
    output: Vec<ValueInfo>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    output: Vec<String>,
    #[prost(string, tag = "3")]
    name: String,
    #[prost(string, tag = "4")]
    op_type: String,
    #[prost(message, repeated, tag = "5")]
    attribute: Vec<AttributeProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct AttributeProto {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(float, tag = "2")]
    f: f32,
    #[prost(int64, tag = "3")]
    i: i64,
    #[prost(bytes = "vec", tag = "4")]
    s: Vec<u8>,
    #[prost(int64, repeated, tag = "8")]
    ints: Vec<i64>,
    /// `FLOAT` = 1, `INT` = 2, `STRING` = 3, `INTS` = 7.
    #[prost(int32, tag = "20")]
    r#type: i32,
}

/// `onnx.TensorProto`: dims, the element type and the raw little-endian data.
#[derive(Clone, PartialEq, prost::Message)]
struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    dims: Vec<i64>,
    /// `FLOAT` = 1, `INT64` = 7.
    #[prost(int32, tag = "2")]
    data_type: i32,
    #[prost(string, tag = "8")]
    name: String,
    #[prost(bytes = "vec", tag = "9")]
    raw_data: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ValueInfo {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, optional, tag = "2")]
    r#type: Option<TypeProto>,
    #[prost(string, tag = "3")]
    doc_string: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TypeProto {
    #[prost(message, optional, tag = "1")]
    tensor_type: Option<TensorType>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TensorType {
    #[prost(int32, tag = "1")]
    elem_type: i32,
    #[prost(message, optional, tag = "2")]
    shape: Option<ShapeProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ShapeProto {
    #[prost(message, repeated, tag = "1")]
    dim: Vec<DimProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct DimProto {
    #[prost(oneof = "DimValue", tags = "1, 2")]
    value: Option<DimValue>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum DimValue {
    #[prost(int64, tag = "1")]
    Value(i64),
    #[prost(string, tag = "2")]
    Param(String),
}

/// One dimension of a graph input or output.
#[derive(Debug, Clone)]
pub enum Dim {
    /// A fixed size.
    Fixed(usize),
    /// A size given at run time, by name (e.g. `batch`).
    Named(&'static str),
}

/// An attribute of a node.
#[derive(Debug, Clone)]
pub enum Attr {
    /// An integer.
    Int(i64),
    /// A float.
    Float(f32),
    /// A list of integers.
    Ints(Vec<i64>),
    /// A string.
    Str(&'static str),
}

/// A graph under construction: nodes in order, weights as initializers, unique value names.
#[derive(Default)]
pub struct Graph {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: Vec<ValueInfo>,
    outputs: Vec<ValueInfo>,
    counter: usize,
}

fn value_info(name: &str, dims: &[Dim], doc: &str) -> ValueInfo {
    ValueInfo {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorType {
                elem_type: 1,
                shape: Some(ShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| DimProto {
                            value: Some(match d {
                                Dim::Fixed(n) => DimValue::Value(*n as i64),
                                Dim::Named(s) => DimValue::Param((*s).into()),
                            }),
                        })
                        .collect(),
                }),
            }),
        }),
        doc_string: doc.into(),
    }
}

impl Graph {
    /// A float graph input.
    pub fn input(&mut self, name: &str, dims: &[Dim], doc: &str) -> String {
        self.inputs.push(value_info(name, dims, doc));
        name.to_string()
    }

    /// Marks `value` as the float graph output `name` (through an `Identity` when renamed).
    pub fn output(&mut self, value: &str, name: &str, dims: &[Dim], doc: &str) {
        if value != name {
            self.nodes.push(NodeProto {
                input: vec![value.into()],
                output: vec![name.into()],
                name: format!("{name}_identity"),
                op_type: "Identity".into(),
                attribute: Vec::new(),
            });
        }
        self.outputs.push(value_info(name, dims, doc));
    }

    /// A float constant (weights, biases, scales), named after `hint`.
    pub fn constant(&mut self, hint: &str, dims: &[usize], values: &[f32]) -> String {
        assert_eq!(dims.iter().product::<usize>(), values.len(), "{hint}");
        let name = self.fresh(hint);
        self.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: 1,
            name: name.clone(),
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
        name
    }

    /// An int64 constant (indices, shapes).
    pub fn constant_i64(&mut self, hint: &str, values: &[i64]) -> String {
        let name = self.fresh(hint);
        self.initializers.push(TensorProto {
            dims: vec![values.len() as i64],
            data_type: 7,
            name: name.clone(),
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
        name
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.counter += 1;
        format!("{hint}_{}", self.counter)
    }

    /// A node of `op` on `inputs`; returns its (one) output's name.
    pub fn node(&mut self, op: &str, inputs: &[&str], attrs: &[(&str, Attr)]) -> String {
        let out = self.fresh(&op.to_lowercase());
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            name: out.clone(),
            op_type: op.into(),
            attribute: attrs
                .iter()
                .map(|(name, a)| {
                    let mut p = AttributeProto {
                        name: (*name).into(),
                        ..AttributeProto::default()
                    };
                    match a {
                        Attr::Int(i) => (p.i, p.r#type) = (*i, 2),
                        Attr::Float(f) => (p.f, p.r#type) = (*f, 1),
                        Attr::Ints(v) => (p.ints, p.r#type) = (v.clone(), 7),
                        Attr::Str(v) => (p.s, p.r#type) = (v.as_bytes().to_vec(), 3),
                    }
                    p
                })
                .collect(),
        });
        out
    }

    /// `burn::nn::conv::Conv2d` on `x`.
    pub fn conv(&mut self, c: &Conv2d, x: &str) -> String {
        let weight = values(c.weight.val());
        let dims = c.weight.dims();
        let wname = self.constant("conv_w", &dims, &weight);
        let mut inputs = vec![x.to_string(), wname];
        if let Some(b) = &c.bias {
            let bias = values(b.val());
            inputs.push(self.constant("conv_b", &[bias.len()], &bias));
        }
        let [kh, kw] = c.kernel_size;
        let [sh, sw] = c.stride;
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let mut attrs = vec![
            ("kernel_shape", Attr::Ints(vec![kh as i64, kw as i64])),
            ("strides", Attr::Ints(vec![sh as i64, sw as i64])),
            (
                "dilations",
                Attr::Ints(c.dilation.iter().map(|&d| d as i64).collect()),
            ),
            ("group", Attr::Int(c.groups as i64)),
        ];
        attrs.push(padding(&c.padding));
        self.node("Conv", &refs, &attrs)
    }

    /// `burn::nn::BatchNorm` on its running statistics (inference).
    pub fn batch_norm(&mut self, bn: &BatchNorm, x: &str) -> String {
        let gamma = values(bn.gamma.val());
        let n = gamma.len();
        let scale = self.constant("bn_scale", &[n], &gamma);
        let beta = values(bn.beta.val());
        let bias = self.constant("bn_bias", &[n], &beta);
        let mean = values(bn.running_mean.value());
        let mean = self.constant("bn_mean", &[n], &mean);
        let var = values(bn.running_var.value());
        let var = self.constant("bn_var", &[n], &var);
        self.node(
            "BatchNormalization",
            &[x, &scale, &bias, &mean, &var],
            &[("epsilon", Attr::Float(bn.epsilon as f32))],
        )
    }

    /// `burn::nn::pool::MaxPool2d` on `x`.
    pub fn max_pool(&mut self, p: &MaxPool2d, x: &str) -> String {
        let [kh, kw] = p.kernel_size;
        let [sh, sw] = p.stride;
        self.node(
            "MaxPool",
            &[x],
            &[
                ("kernel_shape", Attr::Ints(vec![kh as i64, kw as i64])),
                ("strides", Attr::Ints(vec![sh as i64, sw as i64])),
                ("ceil_mode", Attr::Int(i64::from(p.ceil_mode))),
                padding(&p.padding),
            ],
        )
    }

    /// `burn::nn::Linear` (`y = x W + b`, `W` as `[in, out]`) on a `[batch, in]` input.
    pub fn linear(&mut self, l: &Linear, x: &str) -> String {
        let dims = l.weight.dims();
        let w = values(l.weight.val());
        let wname = self.constant("dense_w", &dims, &w);
        let mut inputs = vec![x.to_string(), wname];
        if let Some(b) = &l.bias {
            let bias = values(b.val());
            inputs.push(self.constant("dense_b", &[bias.len()], &bias));
        }
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        self.node("Gemm", &refs, &[])
    }

    /// `min(max(x, lo), hi)`.
    pub fn clip(&mut self, x: &str, lo: f32, hi: f32) -> String {
        let lo = self.constant("clip_min", &[], &[lo]);
        let hi = self.constant("clip_max", &[], &[hi]);
        self.node("Clip", &[x, &lo, &hi], &[])
    }

    /// The model: this graph with its producer, opset and metadata (`key`, `value` pairs that
    /// ONNX Runtime shows as the model's custom metadata).
    pub fn finish(self, doc: &str, metadata: &[(String, String)]) -> ModelProto {
        ModelProto {
            // IR version 7 goes with opset 13.
            ir_version: 7,
            producer_name: "runner".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            doc_string: doc.into(),
            graph: Some(GraphProto {
                node: self.nodes,
                name: "runner".into(),
                initializer: self.initializers,
                input: self.inputs,
                output: self.outputs,
            }),
            opset_import: vec![OperatorSetId {
                domain: String::new(),
                version: OPSET,
            }],
            metadata_props: metadata
                .iter()
                .map(|(k, v)| StringPair {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
        }
    }
}

impl ModelProto {
    /// The serialized model.
    pub fn bytes(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    /// The number of nodes of the graph.
    pub fn nodes(&self) -> usize {
        self.graph.as_ref().map_or(0, |g| g.node.len())
    }
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 values")
}

/// burn's padding as ONNX's: explicit `pads` (`[top, left, bottom, right]`), or `same` as
/// `SAME_UPPER` (burn, as Keras, puts an odd pixel of padding at the end).
fn padding(p: &PaddingConfig2d) -> (&'static str, Attr) {
    match *p {
        PaddingConfig2d::Valid => ("pads", Attr::Ints(vec![0; 4])),
        PaddingConfig2d::Explicit(t, l, b, r) => (
            "pads",
            Attr::Ints(vec![t as i64, l as i64, b as i64, r as i64]),
        ),
        PaddingConfig2d::Same => ("auto_pad", Attr::Str("SAME_UPPER")),
    }
}
