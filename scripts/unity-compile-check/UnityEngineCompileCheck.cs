// COMPILE CHECK ONLY: NOT UnityEngine. scripts/test-clients.sh compiles this into a throwaway
// assembly (target/clients/unity/UnityEngine.dll) so that Mono's mcs can type-check the Unity
// package's runtime (with UNITY_5_3_OR_NEWER defined, as Unity does) and the Texture Generator
// sample without a Unity installation. It declares only the few types and members they use, with
// the signatures Unity's own UnityEngine.CoreModule / IMGUIModule give them; every body throws.
// It proves that the C# compiles against the binding and against these signatures, nothing
// about behaviour inside Unity. Never shipped: it lives outside unity/com.stablediffusion.runtime.
using System;

namespace AOT
{
    // Unity's own (UnityEngine.CoreModule): the binding uses it when UNITY_5_3_OR_NEWER is defined.
    [AttributeUsage(AttributeTargets.Method)]
    public class MonoPInvokeCallbackAttribute : Attribute
    {
        public MonoPInvokeCallbackAttribute(Type type) { }
    }
}

namespace UnityEngine
{
    static class CompileCheck
    {
        public static Exception Only() { return new NotSupportedException("UnityEngine compile-check stand-in: nothing runs"); }
    }

    public class Object
    {
        public string name { get { throw CompileCheck.Only(); } set { throw CompileCheck.Only(); } }
        public static void Destroy(Object obj) { throw CompileCheck.Only(); }
    }

    public class Component : Object { }
    public class Behaviour : Component { }
    public class MonoBehaviour : Behaviour { }

    public enum TextureFormat { RGB24 = 3, RGBA32 = 4 }
    public enum TextureWrapMode { Repeat = 0, Clamp = 1 }
    public enum FilterMode { Point = 0, Bilinear = 1, Trilinear = 2 }

    public struct Color32
    {
        public byte r, g, b, a;
        public Color32(byte r, byte g, byte b, byte a) { this.r = r; this.g = g; this.b = b; this.a = a; }
    }

    public struct Rect
    {
        public Rect(float x, float y, float width, float height) { throw CompileCheck.Only(); }
    }

    public class Texture : Object
    {
        public virtual int width { get { throw CompileCheck.Only(); } set { throw CompileCheck.Only(); } }
        public virtual int height { get { throw CompileCheck.Only(); } set { throw CompileCheck.Only(); } }
        public TextureWrapMode wrapMode { get { throw CompileCheck.Only(); } set { throw CompileCheck.Only(); } }
        public FilterMode filterMode { get { throw CompileCheck.Only(); } set { throw CompileCheck.Only(); } }
    }

    public sealed class Texture2D : Texture
    {
        public Texture2D(int width, int height, TextureFormat textureFormat, bool mipChain) { throw CompileCheck.Only(); }
        public void SetPixels32(Color32[] colors) { throw CompileCheck.Only(); }
        public void Apply() { throw CompileCheck.Only(); }
    }

    public class Material : Object
    {
        public Texture mainTexture { get { throw CompileCheck.Only(); } set { throw CompileCheck.Only(); } }
    }

    public class Renderer : Component
    {
        public Material material { get { throw CompileCheck.Only(); } set { throw CompileCheck.Only(); } }
    }

    public class GUI
    {
        public static void Label(Rect position, string text) { throw CompileCheck.Only(); }
        public static void DrawTexture(Rect position, Texture image) { throw CompileCheck.Only(); }
        public static void DrawTextureWithTexCoords(Rect position, Texture image, Rect texCoords) { throw CompileCheck.Only(); }
    }

    public static class Debug
    {
        public static void Log(object message) { throw CompileCheck.Only(); }
        public static void LogWarning(object message) { throw CompileCheck.Only(); }
        public static void LogWarning(object message, Object context) { throw CompileCheck.Only(); }
        public static void LogError(object message) { throw CompileCheck.Only(); }
        public static void LogError(object message, Object context) { throw CompileCheck.Only(); }
        public static void LogException(Exception exception, Object context) { throw CompileCheck.Only(); }
    }

    public abstract class PropertyAttribute : Attribute { }

    [AttributeUsage(AttributeTargets.Field, Inherited = true, AllowMultiple = true)]
    public class HeaderAttribute : PropertyAttribute
    {
        public readonly string header;
        public HeaderAttribute(string header) { this.header = header; }
    }

    [AttributeUsage(AttributeTargets.Field, Inherited = true, AllowMultiple = false)]
    public class TooltipAttribute : PropertyAttribute
    {
        public readonly string tooltip;
        public TooltipAttribute(string tooltip) { this.tooltip = tooltip; }
    }

    [AttributeUsage(AttributeTargets.Method, AllowMultiple = true)]
    public sealed class ContextMenu : Attribute
    {
        public ContextMenu(string itemName) { }
    }
}
