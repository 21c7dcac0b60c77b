"""Offscreen renderers for the synthetic data: moderngl + EGL (fast) and a pure-numpy z-buffer (fallback/oracle).

Both draw flat-shaded, untextured grey triangles on a black background with a two-sided Lambert term
(|n.l|, since CAD normals are unreliable) from a world-fixed directional light, and return RGBA uint8
(alpha = coverage). Pixel (r, c) samples the point (r + 0.5, c + 0.5) of the projection in camera.project.
"""
import logging

import numpy as np

from dpcr_jax.data import camera

# Blender's default lamp (AttentionDPCR keeps it), in the OBJ frame: fixed in the world, so shading
# changes with azimuth as in the original renders.
LIGHT_POSITION = np.array([4.076, 5.904, -1.005])
ALBEDO = 0.8  # Blender's default diffuse grey
AMBIENT = 0.3  # stands in for the original ambient occlusion term (approximate)


def face_shading(vertices: np.ndarray, faces: np.ndarray, light_dir: np.ndarray | None = None) -> np.ndarray:
  """Grey level in [0,1] per face [F]: ALBEDO (AMBIENT + (1 - AMBIENT) |n.l|)."""
  light_dir = LIGHT_POSITION if light_dir is None else light_dir
  light_dir = light_dir / np.linalg.norm(light_dir)
  tri = vertices[faces]
  n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
  n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
  return ALBEDO * (AMBIENT + (1.0 - AMBIENT) * np.abs(n @ light_dir))


def render_numpy(vertices, faces, rotation, cam_pos, focal, height, width, supersample: int = 1) -> np.ndarray:
  """Vectorised z-buffer rasteriser. Returns RGBA uint8 [H,W,4] (black background, alpha = coverage)."""
  if supersample > 1:
    big = render_numpy(vertices, faces, rotation, cam_pos, focal * supersample, height * supersample,
                       width * supersample).astype(np.float32)
    small = big.reshape(height, supersample, width, supersample, 4).mean((1, 3))
    return np.round(small).astype(np.uint8)
  shade = face_shading(vertices, faces)
  p_cam = camera.world_to_camera(vertices, rotation, cam_pos)
  depth = -p_cam[:, 2]
  if np.any(depth <= 1e-6):
    raise ValueError("render_numpy: mesh crosses the camera plane (no near-plane clipping)")
  rc = camera.project(p_cam, focal, height, width)
  tri = rc[faces]  # [F,3,2] (row, col)
  inv_z = 1.0 / depth[faces]  # [F,3]
  # Pixels whose centre (r + .5, c + .5) lies in the triangle's bounding box.
  lo = np.ceil(tri.min(1) - 0.5).astype(np.int64)
  hi = np.floor(tri.max(1) - 0.5).astype(np.int64)
  lo = np.maximum(lo, 0)
  hi = np.minimum(hi, [height - 1, width - 1])
  span = np.maximum(hi - lo + 1, 0)
  counts = span[:, 0] * span[:, 1]
  face_id = np.repeat(np.arange(len(faces)), counts)
  local = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
  r = lo[face_id, 0] + local // span[face_id, 1]
  c = lo[face_id, 1] + local % span[face_id, 1]
  p = np.stack([r + 0.5, c + 0.5], -1)
  a, b, d = tri[face_id, 0], tri[face_id, 1], tri[face_id, 2]

  def cross(u, v):
    return u[:, 0] * v[:, 1] - u[:, 1] * v[:, 0]

  area = cross(b - a, d - a)
  ok = np.abs(area) > 1e-12
  safe = np.where(ok, area, 1.0)
  w0 = cross(d - b, p - b) / safe
  w1 = cross(a - d, p - d) / safe
  w2 = 1.0 - w0 - w1
  inside = ok & (w0 >= 0) & (w1 >= 0) & (w2 >= 0)
  iz = inv_z[face_id]
  z_inv = w0 * iz[:, 0] + w1 * iz[:, 1] + w2 * iz[:, 2]  # 1/depth is affine in screen space
  pix = (r * width + c)[inside]
  z_inv, face_id = z_inv[inside], face_id[inside]
  order = np.lexsort((-z_inv, pix))  # nearest (largest 1/depth) first within each pixel
  pix, face_id = pix[order], face_id[order]
  first = np.ones(len(pix), bool)
  first[1:] = pix[1:] != pix[:-1]
  out = np.zeros((height * width, 4), np.uint8)
  grey = np.round(255 * shade[face_id[first]]).astype(np.uint8)
  out[pix[first], :3] = grey[:, None]
  out[pix[first], 3] = 255
  return out.reshape(height, width, 4)


_VERTEX_SHADER = """
#version 330
uniform mat4 mvp;
in vec3 in_position;
in float in_shade;
out float v_shade;
void main() { gl_Position = mvp * vec4(in_position, 1.0); v_shade = in_shade; }
"""
_FRAGMENT_SHADER = """
#version 330
in float v_shade;
out vec4 f_color;
void main() { f_color = vec4(v_shade, v_shade, v_shade, 1.0); }
"""


class ModernGLRenderer:
  """moderngl on an EGL standalone context (Mesa llvmpipe on CPU machines). One context per process."""

  def __init__(self, samples: int = 4):
    import moderngl  # pylint: disable=g-import-not-at-top
    # glcontext dlopens unversioned libGL.so/libEGL.so (-dev packages); the .so.1 names exist on bare machines.
    self._ctx = moderngl.create_standalone_context(backend="egl", libgl="libGL.so.1", libegl="libEGL.so.1")
    self._prog = self._ctx.program(vertex_shader=_VERTEX_SHADER, fragment_shader=_FRAGMENT_SHADER)
    self._samples = samples
    self._fbos = {}

  def _framebuffers(self, height, width):
    key = (height, width)
    if key not in self._fbos:
      ctx = self._ctx
      final = ctx.framebuffer(color_attachments=[ctx.renderbuffer((width, height), 4)])
      if self._samples > 1:
        msaa = ctx.framebuffer(color_attachments=[ctx.renderbuffer((width, height), 4, samples=self._samples)],
                               depth_attachment=ctx.depth_renderbuffer((width, height), samples=self._samples))
      else:
        final = ctx.framebuffer(color_attachments=[ctx.renderbuffer((width, height), 4)],
                                depth_attachment=ctx.depth_renderbuffer((width, height)))
        msaa = final
      self._fbos[key] = (msaa, final)
    return self._fbos[key]

  def render(self, vertices, faces, rotation, cam_pos, focal, height, width) -> np.ndarray:
    """Same contract as render_numpy. RGBA uint8 [H,W,4]."""
    with self._ctx:  # make this context current: a process may hold several (e.g. tests)
      return self._render(vertices, faces, rotation, cam_pos, focal, height, width)

  def _render(self, vertices, faces, rotation, cam_pos, focal, height, width) -> np.ndarray:
    import moderngl  # pylint: disable=g-import-not-at-top
    ctx = self._ctx
    shade = face_shading(vertices, faces)
    data = np.concatenate([vertices[faces].reshape(-1, 3), np.repeat(shade, 3)[:, None]], axis=1)
    mvp = camera.projection_matrix(focal, height, width) @ camera.view_matrix(rotation, cam_pos)
    self._prog["mvp"].write(mvp.T.astype("f4").tobytes())  # GLSL is column-major
    vbo = ctx.buffer(data.astype("f4").tobytes())
    vao = ctx.vertex_array(self._prog, [(vbo, "3f 1f", "in_position", "in_shade")])
    msaa, final = self._framebuffers(height, width)
    msaa.use()
    ctx.enable(moderngl.DEPTH_TEST)
    ctx.disable(moderngl.CULL_FACE)
    msaa.clear(0.0, 0.0, 0.0, 0.0, depth=1.0)
    vao.render(moderngl.TRIANGLES)
    if msaa is not final:
      ctx.copy_framebuffer(final, msaa)
    img = np.frombuffer(final.read(components=4, alignment=1), np.uint8).reshape(height, width, 4)[::-1]
    vao.release()
    vbo.release()
    return img.copy()


class Renderer:
  """Renders with moderngl+EGL when available, else (with a one-line warning) with the numpy rasteriser."""

  def __init__(self, backend: str = "auto", samples: int = 4):
    if backend not in ("auto", "moderngl", "numpy"):
      raise ValueError(f"backend must be 'auto', 'moderngl' or 'numpy', got {backend!r}")
    self._gl = None
    self.backend = "numpy"
    if backend in ("auto", "moderngl"):
      try:
        self._gl = ModernGLRenderer(samples=samples)
        self.backend = "moderngl"
      except Exception as e:  # pylint: disable=broad-except
        if backend == "moderngl":
          raise
        logging.warning("moderngl/EGL unavailable (%s: %s); using the numpy rasteriser (~10x slower).",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    self._supersample = 2 if samples > 1 else 1

  def render(self, vertices, faces, rotation, cam_pos, focal, height, width) -> np.ndarray:
    """RGBA uint8 [H,W,4] of the mesh seen from the camera (rotation [3,3], cam_pos [3]); focal in pixels."""
    if self._gl is not None:
      return self._gl.render(vertices, faces, rotation, cam_pos, focal, height, width)
    return render_numpy(vertices, faces, rotation, cam_pos, focal, height, width, supersample=self._supersample)
